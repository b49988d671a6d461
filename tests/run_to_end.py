"""Run a test script as ``__main__`` (``python run_to_end.py script.py args...``) and print
:data:`FINISHED` once its body has returned, before the interpreter's exit handlers run.
Arguments split by ``::`` run the script once per part, in turn, in this one process (and,
under torchrun, in its one process group): several cases for the price of one launch.

torchrun can report a run that trained to the end as failed: gloo's worker threads sometimes
abort the process while the interpreter shuts down ("terminate called without an active
exception", SIGABRT; pytorch/pytorch#179291 describes the race and was abandoned upstream).
``conftest.launch_script`` reads this line to tell that abort from a script that failed.
"""

import os
import runpy
import sys

FINISHED = "run_to_end: the script's body returned"

if __name__ == "__main__":
    script, args = sys.argv[1], sys.argv[2:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runs: list[list[str]] = [[]]
    for arg in args:
        if arg == "::":
            runs.append([])
        else:
            runs[-1].append(arg)
    for run in runs:
        sys.argv = [script, *run]
        runpy.run_path(script, run_name="__main__")
    print(FINISHED, flush=True)
