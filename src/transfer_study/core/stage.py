"""User-facing errors: one line that names the problem and the fix, no traceback."""

import atexit
import errno
import functools
import gc
import os
import reprlib
import signal
import sys
import threading
import time

from transfer_study.core import timing

PARENT_POLL_SECONDS = 1.0  # how soon a stage notices that DVC, which started it, is gone


class UserError(Exception):
    """A problem with params, data or the environment that the user can fix."""


class ParamsError(UserError):
    """A key of params.yaml is missing, unknown, of the wrong type or out of range."""


# Values and keys are echoed in a bounded form: a YAML alias bomb (a list nesting itself by
# reference, billions of leaves) or a 50 MB string comes back in at most MAX_SHOWN characters.
_BOUNDED = reprlib.Repr()
_BOUNDED.maxlevel = 2
_BOUNDED.maxlist = _BOUNDED.maxtuple = _BOUNDED.maxdict = _BOUNDED.maxset = 4
_BOUNDED.maxstring = _BOUNDED.maxother = 40
_BOUNDED.maxlong = 24
MAX_SHOWN = 80  # characters


def shown(value):
    """`value` as a short repr, for an error line."""
    text = _BOUNDED.repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


# Where a distributed run says which process this is: torchrun sets RANK, LOCAL_RANK and
# GROUP_RANK, Lightning's DDP launcher LOCAL_RANK and NODE_RANK, srun SLURM_PROCID, and a node
# started by hand NODE_RANK.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
# How many processes there are: torchrun sets WORLD_SIZE and LOCAL_WORLD_SIZE, Lightning's DDP
# launcher WORLD_SIZE, srun SLURM_NTASKS.
SIZE_VARIABLES = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS")
MAX_PROCESSES = 2**20  # far above any cluster's process count: a larger number is garbage


def _refuse_variable(name, accepts):
    value = os.environ.get(name, "")
    raise UserError(f"environment variable {name} = {shown(value)}: accepts {accepts}")


def launcher_variable(name, unset=0):
    """The whole number a launcher set in the environment variable `name`."""
    try:
        return int(os.environ.get(name, str(unset)))
    except ValueError:
        first = " (0 for the first process of a distributed run)" if name in RANK_VARIABLES else ""
        _refuse_variable(name, f"a whole number{first}")


def check_launcher_variables():
    """Refuse launcher variables that no launcher sets together, before any work: a rank out of
    range makes every rank skip its share (featurize caches 0 rows) or train a whole run that
    nobody's outputs record, and Lightning turns a bad size into a traceback."""
    sizes = {}
    for name in SIZE_VARIABLES:
        if name in os.environ:
            sizes[name] = launcher_variable(name)
            if not 1 <= sizes[name] <= MAX_PROCESSES:
                _refuse_variable(name, f"a whole number from 1 to {MAX_PROCESSES:,}")
    world = sizes.get("WORLD_SIZE")
    # The count each rank counts within; featurize reads an unset WORLD_SIZE as 1, so RANK > 0
    # needs it. The others may come without theirs (Lightning's launcher sets no
    # LOCAL_WORLD_SIZE; a node started by hand has no size before Lightning sets one).
    local = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in sizes else "WORLD_SIZE"
    bounds = {
        "RANK": ("WORLD_SIZE", world or 1),
        "LOCAL_RANK": (local, sizes.get(local)),
        "NODE_RANK": ("WORLD_SIZE", world),
        "GROUP_RANK": ("WORLD_SIZE", world),
        "SLURM_PROCID": ("SLURM_NTASKS", sizes.get("SLURM_NTASKS")),
    }
    for name, (size_name, size) in bounds.items():
        rank = launcher_variable(name)
        if not 0 <= rank < (size or MAX_PROCESSES):
            unset = "" if size_name in os.environ else " when unset"
            why = f" (below {size_name}, {size}{unset})" if size else ""
            _refuse_variable(name, f"a whole number from 0 to {(size or MAX_PROCESSES) - 1:,}{why}")
    rank, world = launcher_variable("RANK"), world or 1
    # srun's tasks need none: Lightning's SLURM environment takes the address from the node list.
    if rank > 0 and world > 1 and not os.environ.get("MASTER_ADDR"):
        raise UserError(
            f"environment variable MASTER_ADDR is not set: RANK = {rank} of WORLD_SIZE = {world} "
            "connects to rank 0 there; set it to the address of rank 0's machine"
        )


def is_first_process():
    """Whether this process is global rank 0 of a distributed run, or runs alone."""
    return all(launcher_variable(name) == 0 for name in RANK_VARIABLES)


_stop_signal = None  # the name of the signal that asked this stage to stop, once one has


def _interrupt(signum, frame):
    # SIGTERM (a scheduler's kill, `kill PID`) unwinds like Ctrl+C: temporary files are removed
    # on the way out, and no output is renamed into place.
    global _stop_signal
    _stop_signal = signal.Signals(signum).name
    raise KeyboardInterrupt(_stop_signal)


def stop_if_signalled():
    """Raise KeyboardInterrupt again if a SIGINT or SIGTERM came before. The first one can be
    lost on its way out: Python only prints an exception raised inside a __del__ method or a
    garbage-collection callback, and a library may catch it. Loops call this at every batch, so
    a stage stops at the next one whatever swallowed the first."""
    if _stop_signal is not None:
        raise KeyboardInterrupt(_stop_signal)


def _stop_when_orphaned():
    """Under DVC (which sets DVC_STAGE), stop as on SIGTERM once the process that started this
    stage is gone: a killed `dvc exp run` or a closed terminal must not leave the stage writing
    outputs into a workspace nobody records. An orphan is handed to another parent, so its
    parent pid changes."""
    if "DVC_STAGE" not in os.environ:
        return
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@atexit.register
def _finalize_while_python_can():
    """Free what a failed run left behind, before Python tears its modules down. An uncaught
    exception's traceback (kept in sys.last_*) holds the run's frames, and with them DVCLive's
    git objects (dulwich), whose finalizers import: run at the very end, they would each print
    "ImportError: sys.meta_path is None" after the traceback."""
    for name in ("last_exc", "last_type", "last_value", "last_traceback"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    gc.collect()


def exit_on_user_error(main):
    """Wrap a stage's main(): a UserError or a full disk prints one line and exits with status 2;
    SIGINT/SIGTERM stop it with status 130, leaving no output half-written."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        # A job started in the background by a script inherits SIGINT ignored; `kill -INT`
        # should still stop it like Ctrl+C.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _interrupt)
        _stop_when_orphaned()
        timing.main_starts()
        first_process = False
        try:
            # Checked before any work (Lightning reads some of them as it is imported).
            check_launcher_variables()
            first_process = is_first_process()
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                print(
                    f"error: disk full writing {error.filename or 'an output'}; free space and "
                    "rerun (nothing partial was kept)",
                    file=sys.stderr,
                )
            elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                print(
                    f"error: {error.filename or 'a file'}: {error.strerror}; give this user "
                    "access to it (or its folder) and rerun",
                    file=sys.stderr,
                )
            else:
                raise
            sys.exit(2)
        except KeyboardInterrupt:
            print(
                "interrupted: no output of this stage was completed; rerun dvc repro",
                file=sys.stderr,
            )
            sys.exit(130)
        finally:
            if first_process:  # its counts cover every rank's
                timing.write_record()

    return wrapper
