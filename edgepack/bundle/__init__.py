"""Stage 5, bundle: the chosen variant with its manifest, report, launchers, deploy files and offline wheels;
and checking a bundle (verify, inspect)."""

from edgepack.bundle.verify import verify_bundle
from edgepack.bundle.write import write_bundle

__all__ = ["verify_bundle", "write_bundle"]
