"""Train and val batches from in-memory uint8 or feature tensors, on the host or the GPU."""

import pytorch_lightning as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler


class _Batches(Dataset):
    """In-memory tensors indexed a whole batch at a time (one gather, no per-sample Python).

    With `flipped` (features of the mirrored images), each sample of a batch comes from either
    at random: horizontal-flip augmentation on cached features.
    """

    def __init__(self, inputs, labels, flipped=None):
        self.inputs, self.labels, self.flipped = inputs, labels, flipped

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, indices):
        indices = torch.as_tensor(indices)
        inputs = self.inputs[indices]
        if self.flipped is not None:
            use_flipped = torch.rand(len(indices)) < 0.5
            inputs = torch.where(
                use_flipped.to(inputs.device)[:, None], self.flipped[indices], inputs
            )
        return inputs, self.labels[indices]


class _ShardBatches(BatchSampler):
    """Batches of this process's shard of the indices, reshuffled each epoch (Lightning calls
    set_epoch). With one process the shard is the whole dataset."""

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)


def make_loader(
    inputs,
    labels,
    batch_size,
    shuffle,
    seed=0,
    pin_memory=False,
    device=None,
    rank=0,
    world_size=1,
    flipped=None,
):
    """Batches of in-memory tensors; with `device`, the tensors move there once, up front."""
    if flipped is not None:
        flipped = torch.as_tensor(flipped).to(device)
    dataset = _Batches(
        torch.as_tensor(inputs).to(device), torch.as_tensor(labels).to(device), flipped
    )
    shard = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )
    sampler = _ShardBatches(shard, batch_size, drop_last=False)
    return DataLoader(dataset, sampler=sampler, batch_size=None, pin_memory=pin_memory)


class InMemoryData(pl.LightningDataModule):
    """Train and val tensors; loaders are made once the processes exist, so that under DDP each
    rank takes its own shard."""

    def __init__(self, train, val, batch_size, seed, pin_memory, device):
        """`train` is (inputs, labels) or (inputs, labels, flipped inputs)."""
        super().__init__()
        self.train, self.val = train, val
        self.options = {"batch_size": batch_size, "pin_memory": pin_memory, "device": device}
        self.seed = seed
        self.loaders = {}

    def _loader(self, split, shuffle):
        # Each loader is made once: a per-batch lr schedule has Lightning count the train batches
        # before fitting, and a second loader would copy the tensors to the device again.
        if split not in self.loaders:
            self.loaders[split] = self._make_loader(getattr(self, split), shuffle)
        return self.loaders[split]

    def _make_loader(self, split, shuffle):
        inputs, labels, *flipped = split
        return make_loader(
            inputs,
            labels,
            flipped=flipped[0] if flipped else None,
            shuffle=shuffle,
            seed=self.seed,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            **self.options,
        )

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)


def trains_on_gpu(train):
    """Whether Lightning will put this training on CUDA (accelerator auto or gpu, and a GPU)."""
    return torch.cuda.is_available() and train.accelerator != "cpu"


def training_device(train):
    """The device this training runs on: CUDA where trains_on_gpu, else the CPU."""
    return torch.device("cuda" if trains_on_gpu(train) else "cpu")


def data_device(train, nbytes):
    """Where the training tensors live: "cuda" when one GPU trains and they take under a quarter
    of its free memory (batches are then gathered there, with no host-to-device copy per step),
    else None (host memory)."""
    one_gpu = trains_on_gpu(train) and train.devices == 1 and train.num_nodes == 1
    if one_gpu and nbytes < torch.cuda.mem_get_info()[0] / 4:
        return "cuda"
    return None


def in_memory_data(inputs, train, seed):
    """The data module of TrainingInputs `inputs`, its tensors on the GPU where data_device
    puts them, else in host memory (pinned when bound for a GPU)."""
    device = data_device(train, sum(x.nbytes for x in (*inputs.train, inputs.val[0])))
    pin = device is None and trains_on_gpu(train)
    return InMemoryData(inputs.train, inputs.val, inputs.batch_size, seed, pin, device)
