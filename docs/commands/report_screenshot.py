"""The screenshot of docs/commands/report.md and README.md: the top of the page `make demo` writes,
as headless Chromium renders it (Debian's `chromium` package; no network, a fresh profile).

    python docs/commands/report_screenshot.py [demo-out/report.html] [docs/commands/report.png]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIDTH, HEIGHT = 1100, 1500  # the header, the verdict and the start of the run


def main(page: Path, png: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--host-resolver-rules=MAP * ~NOTFOUND",
                f"--user-data-dir={profile}",
                f"--window-size={WIDTH},{HEIGHT}",
                f"--screenshot={png.resolve()}",
                page.resolve().as_uri(),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )
    print(f"wrote {png}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0] if args else "demo-out/report.html"), Path(args[1] if len(args) > 1 else HERE / "report.png"))
