"""Write-once, atomic preparation of a category folder keyed by its generating parameters."""

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from defectlab.errors import DataError

MANIFEST = "defectlab_prepared.json"


def prepare_category(
    root: Path, category: str, params: dict, write: Callable[[Path], None]
) -> bool:
    """Create ``root/category`` with ``write(tmp_dir)`` unless it exists with the same ``params``.

    The folder is written to a temporary sibling and renamed into place, so an interrupted
    preparation never leaves a half-written category. A folder without our manifest is the
    user's data and is never touched.

    Returns:
        True when the folder was (re)written, False when the cached copy was reused.
    """
    target = root / category
    manifest = target / MANIFEST
    if target.exists():
        if not manifest.is_file():
            raise DataError(
                f"{target} exists but was not written by defectlab (no {MANIFEST}); "
                "choose another data.root or remove the folder"
            )
        if json.loads(manifest.read_text()) == params:
            return False
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{category}-", dir=root))
    try:
        write(tmp)
        (tmp / MANIFEST).write_text(json.dumps(params, indent=2, sort_keys=True))
        if target.exists():  # ours, with other parameters: replace it
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True
