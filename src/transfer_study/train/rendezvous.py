"""DDP whose rendezvous waits a bounded time (train.rendezvous_timeout) and yields to signals."""

import signal
import time
from datetime import timedelta

import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy

from transfer_study.core.stage import UserError


class BoundedDDP(DDPStrategy):
    """Lightning's DDP (train.strategy ddp or ddp_spawn, or auto over several processes). Its
    rendezvous, where every process joins the one at MASTER_ADDR:MASTER_PORT, waits at most
    `seconds` (torch's own bound is 30 minutes), then stops with one line naming who was
    missing and where. `prepare` (rank 0's first write: the checkpoint folder) runs once every
    process has joined, so that a run whose peers never come writes nothing. `seconds` is also
    how long any later collective step may wait for a process (torch's process-group timeout)."""

    def __init__(self, seconds, prepare, start_method):
        super().__init__(timeout=timedelta(seconds=seconds), start_method=start_method)
        self.seconds = seconds
        self.prepare = prepare

    def setup_distributed(self):
        # Python runs signal handlers between bytecodes, and the wait is one C++ call: the
        # stage's handler would run only once it returned. Nothing is written before the wait
        # ends, so SIGINT and SIGTERM take their default action during it and end the process at
        # once (exit status 130 or 143 in a shell).
        stops = (signal.SIGINT, signal.SIGTERM)
        handlers = {signum: signal.signal(signum, signal.SIG_DFL) for signum in stops}
        started = time.monotonic()
        try:
            super().setup_distributed()
        except dist.DistError:
            if time.monotonic() - started < self.seconds:
                raise  # not the wait running out (a port already taken, say)
            raise UserError(self._waited_in_vain()) from None
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        if self.global_rank == 0 and self.prepare is not None:
            self.prepare()

    def _waited_in_vain(self):
        world, env = self.world_size, self.cluster_environment
        if self.global_rank == 0:
            whom = f"the other {world - 1} of {world} processes to join it"
        else:
            whom = "process 0 (node 0)"
        return (
            f"process {self.global_rank} (node {self.node_rank} of train.num_nodes = "
            f"{self.num_nodes}) waited {self.seconds:g} s (train.rendezvous_timeout) for {whom} "
            f"at MASTER_ADDR={env.main_address} MASTER_PORT={env.main_port}: start every node "
            "with that address and port, or raise train.rendezvous_timeout"
        )
