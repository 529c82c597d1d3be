"""A stand-in for train.main under launch/local.sh (tests/test_launch.py): process 1 exits with
status 3 at once; every other process ignores SIGTERM (as a trainer blocked in a collective
does) and waits forever, so only the launcher's SIGKILL ends it."""

import os
import signal
import sys
import time

if __name__ == "__main__":
    if os.environ["JAX_PROCESS_ID"] == "1":
        time.sleep(0.5)
        sys.exit(3)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("waiting in a collective that never completes", flush=True)
    time.sleep(600)
