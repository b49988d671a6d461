"""Run a test script as ``__main__`` (``python run_to_end.py script.py args...``) and print
:data:`FINISHED` once its body has returned, before the interpreter's exit handlers run.
Arguments split by ``::`` run the script once per part, in turn, in this one process (and,
under torchrun, in its one process group): several cases for the price of one launch. With
:data:`OUTPUTS` in the environment (a folder), each run's standard output is also written
there, to ``run<index>.rank<RANK>.txt`` (a test of one run of several reads its own part).

torchrun can report a run that trained to the end as failed: gloo's worker threads sometimes
abort the process while the interpreter shuts down ("terminate called without an active
exception", SIGABRT; pytorch/pytorch#179291 describes the race and was abandoned upstream).
``conftest.launch_script`` reads this line to tell that abort from a script that failed.
"""

import contextlib
import io
import os
import runpy
import sys

FINISHED = "run_to_end: the script's body returned"
OUTPUTS = "RUN_TO_END_OUTPUTS"


class _Tee(io.TextIOBase):
    """Writes to the real stream and keeps a copy."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text):
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


if __name__ == "__main__":
    script, args = sys.argv[1], sys.argv[2:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runs: list[list[str]] = [[]]
    for arg in args:
        if arg == "::":
            runs.append([])
        else:
            runs[-1].append(arg)
    outputs = os.environ.get(OUTPUTS)
    for index, run in enumerate(runs):
        sys.argv = [script, *run]
        if outputs is None:
            runpy.run_path(script, run_name="__main__")
            continue
        tee = _Tee(sys.stdout)
        with contextlib.redirect_stdout(tee):
            runpy.run_path(script, run_name="__main__")
        os.makedirs(outputs, exist_ok=True)
        name = f"run{index}.rank{os.environ.get('RANK', '0')}.txt"
        with open(os.path.join(outputs, name), "w") as f:
            f.write(tee.copy.getvalue())
    # One write: torchrun's workers write unbuffered, where print() writes the text and its
    # newline separately and two ranks' lines interleave mid-line.
    sys.stdout.write(FINISHED + "\n")
    sys.stdout.flush()
