"""Kill a launcher and collect its orphaned worker's exit status (which nobody could collect otherwise).

This process becomes a child subreaper (Linux prctl PR_SET_CHILD_SUBREAPER), so the worker of the killed launcher
is re-parented to it and `waitpid` returns the worker's own exit status. Usage:
    python orphan_exit.py LOG METRICS_JSONL OWNER_LOCK -- <launcher command...>
Prints one JSON line: {"worker_pid", "worker_exit", "stopped_after_s"}.
"""
import ctypes
import json
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36

log_path, metrics, owner = sys.argv[1:4]
cmd = sys.argv[sys.argv.index("--") + 1:]
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}")
with open(log_path, "w") as log:
    launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
deadline = time.monotonic() + 300
while not (os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 2):
    if launcher.poll() is not None or time.monotonic() > deadline:
        sys.exit(f"training did not reach step 2 (launcher exit {launcher.poll()})")
    time.sleep(0.2)
worker = json.load(open(owner))["pid"]
launcher.send_signal(signal.SIGKILL)
launcher.wait()
t0 = time.monotonic()
while True:
    pid, status = os.waitpid(worker, os.WNOHANG)
    if pid == worker:
        break
    if time.monotonic() - t0 > 60:
        os.kill(worker, signal.SIGKILL)
        sys.exit(f"worker {worker} still running 60 s after its launcher died")
    time.sleep(0.05)
print(json.dumps({"worker_pid": worker, "worker_exit": os.waitstatus_to_exitcode(status),
                  "stopped_after_s": round(time.monotonic() - t0, 2)}))
