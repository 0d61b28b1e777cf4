"""The test servers' log: what a server writes while a test reads its output is all there.

Tests wait for log lines (``wait_for_log``) by reading a server's output again and again while it runs;
a line written during such a read must not land over older output (it did: the framework tests' "chat
ended" line went missing about once in fifty runs).
"""

from __future__ import annotations

import sys

from servers import Server

LINES = 2000
WRITER = f"import time\nfor i in range({LINES}):\n    print(f'line {{i:05d}} ' + 'x' * 60)\n    time.sleep(0.0005)"


def test_lines_written_while_the_output_is_read_are_all_kept() -> None:
    server = Server([sys.executable, "-c", WRITER], 0, {})
    try:
        while server.process.poll() is None:
            server.output()
        output = server.output()
    finally:
        server.stop()
    missing = [i for i in range(LINES) if f"line {i:05d} " not in output]
    assert not missing, f"{len(missing)} of {LINES} lines lost, the first: {missing[:5]}"
