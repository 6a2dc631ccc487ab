"""The training batches of a run: a length-grouped map-style dataset, or a stream from
webdataset shards split across ranks, with the position a checkpoint needs to resume
exactly (`Batches.skip`, `Batches.stream_record`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, send_to_device
from rich.console import Console
from torch.utils.data import DataLoader

from vlmalign.config import Config
from vlmalign.data.loading import loader_kwargs
from vlmalign.data.sample import LoadReport
from vlmalign.data.sampler import LENGTH_GROUP, LengthGroupedBatchSampler
from vlmalign.data.shards import ShardStream, StreamPosition, rank_position
from vlmalign.models.vlm import VLM
from vlmalign.objective import Objective
from vlmalign.train.datasets import TrainData, TrainSet, build_stream, build_trainset

console = Console()


def batch_sampler(lengths: list[int], cfg: Config) -> LengthGroupedBatchSampler:
    """Shuffled batches whose order depends only on (seed, epoch), so resume can skip into
    an epoch: length-grouped (train.group_by_length) or plain (group of 1, equal lengths)."""
    tc = cfg.train
    if not tc.group_by_length:
        return LengthGroupedBatchSampler([0] * len(lengths), tc.batch_size, seed=tc.seed, group=1)
    return LengthGroupedBatchSampler(lengths, tc.batch_size, seed=tc.seed, group=LENGTH_GROUP)


@dataclass
class Batches:
    """The training batches of an epoch: a length-grouped map-style dataset, or a stream
    from shards (then moved to the device here and ended together on every rank)."""

    trainset: TrainSet
    loader: DataLoader
    sampler: LengthGroupedBatchSampler | None
    report: LoadReport
    accelerator: Accelerator
    size: int | str

    @property
    def stream(self) -> ShardStream | None:
        return self.trainset.stream

    # A stream's position after the last batch the loop took (this rank), for the checkpoint.
    position: StreamPosition | None = None

    def skip(self, epoch: int, batches_done: int, saved: dict | None = None) -> None:
        """Resume inside `epoch` after `batches_done` batches (all processes together); a
        stream continues from this rank's entry of `saved` (the checkpoint's "stream"
        record, `stream_record`), exact even after skipped records."""
        if self.stream is None:
            self.sampler.skip_next(batches_done)
            return
        acc = self.accelerator
        position = rank_position(saved, acc.process_index, acc.num_processes, epoch)
        if position is not None:
            self.stream.resume(position)
            return
        if saved:
            console.print(f"[yellow]resume: the checkpoint's stream positions (world {saved.get('world')}) do not "
                          f"apply to rank {acc.process_index} of {acc.num_processes} in epoch {epoch}; continuing "
                          f"after {batches_done} batches, which repeats or drops records if some were skipped")
        per_rank = batches_done // acc.num_processes
        self.stream.skip(per_rank * self.loader.batch_size, epoch=epoch)

    def stream_record(self) -> dict:
        """{"stream": {"world": n, "ranks": [position dict per rank]}} for the training
        state, gathered from every rank (collective: call it on all of them); {} for
        map-style data (its position is `batches_done`)."""
        if self.stream is None:
            return {}
        mine = self.position.as_dict() if self.position is not None else None
        return {"stream": {"world": self.accelerator.num_processes, "ranks": gather_object([mine])}}

    def epoch(self, epoch: int):
        if self.stream is None:
            self.loader.set_epoch(epoch)  # one process: Accelerate's loader passes it on
            self.sampler.set_epoch(epoch)  # several: its batch-sampler shard does not
            yield from self.loader
            return
        self.stream.set_epoch(epoch)
        self.position = self.stream.position(self.loader.num_workers)
        for batch in self.loader:
            if not agree(self.accelerator, False):  # every rank still has a batch
                self.position.advance(batch["index"].tolist())  # streamed items' index = position
                yield send_to_device(batch, self.accelerator.device)
            else:
                return
        agree(self.accelerator, True)  # tell the ranks still iterating that this one ran out


def make_batches(model: VLM, objective: Objective, data: TrainData | None, cfg: Config, kind: str,
             accelerator: Accelerator) -> Batches:
    tc = cfg.train
    if cfg.data.shards:
        trainset = build_stream(model, cfg, accelerator.process_index, accelerator.num_processes, kind=kind,
                                objective=objective)
        loader = DataLoader(trainset.dataset, batch_size=tc.batch_size, collate_fn=trainset.collator,
                            **loader_kwargs(cfg.data, accelerator.device))
        return Batches(trainset, loader, None, trainset.stream.report, accelerator, f"{trainset.stream.total} streamed")
    if data is None:
        data = TrainData.prepare(model, cfg, kind)
    elif data.kind != kind:
        raise ValueError(f"recipe {cfg.recipe} trains on {kind!r} data, got {data.kind!r}")
    data.report.check_skip_fraction(cfg.data.max_skip_fraction, "training data")
    trainset = build_trainset(model, objective, data, cfg)
    sampler = batch_sampler(trainset.lengths, cfg)
    # A private generator: the loader draws a seed from it each epoch, which would
    # otherwise shift the global torch RNG between an interrupted run and its resumption.
    workers = loader_kwargs(cfg.data, accelerator.device, decodes_images=data.features is None)
    if workers["num_workers"]:
        _tensors_to_cpu(trainset.dataset)  # forked workers cannot touch CUDA tensors
    loader = DataLoader(trainset.dataset, batch_sampler=sampler, collate_fn=trainset.collator,
                        generator=torch.Generator().manual_seed(tc.seed), **workers)
    return Batches(trainset, loader, sampler, data.report, accelerator, len(trainset.dataset))


def _tensors_to_cpu(dataset) -> None:
    """Move a map-style dataset's cached tensors (features, text states) to the CPU."""
    for name, value in vars(dataset).items():
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            setattr(dataset, name, value.cpu())


def groups(loader, k: int):
    """Micro-batches in groups of k (one optimizer step each); the epoch's last group may
    be shorter."""
    group: list[dict] = []
    for batch in loader:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


def agree(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when it is True on any (a stop request must reach all ranks
    before the collective save)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor(int(flag), device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum") > 0)
