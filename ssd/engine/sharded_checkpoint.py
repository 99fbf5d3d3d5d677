"""Sharded checkpoints: a folder `checkpoint_<step:08d>.dcp/` that every process writes its own part of with
`torch.distributed.checkpoint` (DCP), so that no process ever holds the whole state of a ViT-g.

    checkpoint_00000100.dcp/
        state.pt           everything but the tensors of the method and optimizer: config, step, RNG states,
                           sampler position, health, the optimizer's parameter groups (torch.save, weights only)
        .metadata          DCP's index: for each tensor its shape, dtype and where each stored slice lies
        __<rank>_0.distcp  the slices process <rank> held

Tensors are stored under flat keys, "method/<state-dict key>" and "optimizer/<parameter index>/<state key>"
(the optimizer's own numbering, as a single-file checkpoint has it), so one folder loads three ways:
into a sharded (FSDP2) run at any number of processes, each process reading only the slices it keeps; into an
unsharded run, every process reading whole tensors; and whole into one process for export and evaluation.

Like a single file, the folder appears under its final name only once complete: process 0 writes state.pt into
`.checkpoint_<step>.dcp.tmp-partial/`, every process its slices, then process 0 syncs and renames the folder. All
processes write into one folder, so on several nodes the run folder must be on a shared file system (as a resumed
SLURM job needs anyway). DCP's index is a pickle: it is read with an unpickler that accepts only its own classes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter, _StorageInfo
from torch.nn.modules.module import _IncompatibleKeys

from ssd.engine import distributed
from ssd.files import fsync_path, nearly_full

SUFFIX = ".dcp"
STATE_FILE = "state.pt"
METHOD, OPTIMIZER = "method/", "optimizer/"


class _MetadataUnpickler(pickle.Unpickler):
    """DCP pickles its index; unpickling an arbitrary file could run code, so only the index's own classes and
    the torch types they hold are accepted (a checkpoint may come from someone else, as a weights file can)."""

    def find_class(self, module: str, name: str):
        found = None
        if module == dcp_metadata.__name__:
            found = getattr(dcp_metadata, name, None)
            found = found if isinstance(found, type) and found.__module__ == module else None
        elif (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                                ("torch", "Size"), ("torch.serialization", "_get_layout"),
                                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}:
            found = _StorageInfo if name == "_StorageInfo" else getattr(__import__(module, fromlist=[name]), name)
        elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            found = getattr(torch, name)
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint index")
        return found


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        with open(Path(self.path) / ".metadata", "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError("the index is not a DCP Metadata object")
        metadata.storage_meta = metadata.storage_meta or dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def is_sharded_checkpoint(path: Path) -> bool:
    return path.name.endswith(SUFFIX) and path.is_dir()


def read_index(folder: Path) -> dict[str, dcp_metadata.TensorStorageMetadata]:
    """The stored tensors (key -> shape and dtype), after checking that every slice the index names lies in a
    file of this folder that is long enough: a folder cut short by a copy fails here, not midway through a load."""
    metadata = _SafeReader(folder).read_metadata()
    for info in (metadata.storage_data or {}).values():
        name = info.relative_path
        if os.sep in name or name.startswith(".") or not (folder / name).is_file():
            raise OSError(f"the index names {name!r}, which is not a file of this folder")
        if (folder / name).stat().st_size < info.offset + info.length:
            raise OSError(f"{name} is shorter than the index says (truncated)")
    return {key: entry for key, entry in metadata.state_dict_metadata.items()
            if isinstance(entry, dcp_metadata.TensorStorageMetadata)}


def _flat_tensors(method_state: dict, optimizer_state: dict | None) -> tuple[dict, dict]:
    """(tensors under flat keys, the rest of the optimizer state) of a method and optimizer."""
    tensors = {METHOD + name: value for name, value in method_state.items() if torch.is_tensor(value)}
    rest = None
    if optimizer_state is not None:
        rest = {"param_groups": optimizer_state["param_groups"], "state": {}}
        for index, entries in optimizer_state["state"].items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"{OPTIMIZER}{index}/{key}"] = value
                else:
                    rest["state"].setdefault(index, {})[key] = value
    return tensors, rest


def save(folder: Path, method: nn.Module, optimizer: torch.optim.Optimizer, state: dict, write_state) -> Path:
    """Write `folder` from every process (collective): process 0 first writes `state` with `write_state(path,
    state)`, then each process its own slices of the method's and optimizer's tensors, then process 0 publishes
    the folder. A failure on any process raises on all of them. Returns `folder`."""
    is_writer = distributed.rank_and_world()[0] == 0
    temporary = folder.with_name(f".{folder.name}.tmp-partial")
    tensors, optimizer_rest = _flat_tensors(method.state_dict(), optimizer.state_dict())
    failure = None
    if is_writer:
        try:
            shutil.rmtree(temporary, ignore_errors=True)  # left by a process killed while writing
            temporary.mkdir(parents=True)
            write_state(temporary / STATE_FILE, {**state, "optimizer_rest": optimizer_rest, "sharded": True})
        except Exception as error:
            failure = error
    try:
        _raise_everywhere(failure)
        with _without_collectives_warning():
            dcp.save(tensors, storage_writer=FileSystemWriter(temporary, sync_files=True, thread_count=1),
                     no_dist=not distributed.is_distributed())
    except BaseException as error:  # DCP's CheckpointException is one: raised on every process
        # Judged before the partial folder is removed: DCP hands over each process's exception pickled, which
        # drops the OSError(ENOSPC) that torch.save's zip writer keeps only as the context of its RuntimeError.
        full = nearly_full(folder.parent)
        if is_writer:
            shutil.rmtree(temporary, ignore_errors=True)
        try:
            distributed.barrier()  # no process exits (and has the others stopped) before the partial folder is gone
        except Exception:
            pass
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder)) from error
        raise
    if is_writer:
        try:
            _publish(temporary, folder)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    return folder


def _raise_everywhere(failure: Exception | None) -> None:
    """Raise `failure` (process 0's) on process 0 and a RuntimeError naming it on the others."""
    message = [f"{type(failure).__name__}: {failure}" if failure else None]
    if distributed.is_distributed():
        torch.distributed.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise RuntimeError(f"process 0 could not write the checkpoint's state ({message[0]})")


def _publish(temporary: Path, folder: Path) -> None:
    for path in temporary.iterdir():
        fsync_path(path)
    fsync_path(temporary)
    replaced = folder.with_name(f".{folder.name}.tmp-replaced")
    if folder.exists():  # a second save at the same step (a resumed run stopped at once): the new one wins
        shutil.rmtree(replaced, ignore_errors=True)
        folder.rename(replaced)
    os.replace(temporary, folder)
    shutil.rmtree(replaced, ignore_errors=True)
    fsync_path(folder.parent)


@contextlib.contextmanager
def _without_collectives_warning():
    """DCP warns that no_dist means a single process; here it means no collectives, which is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _load(folder: Path, targets: dict) -> None:
    """Fill `targets` (flat key -> tensor or DTensor) from `folder`; each process reads only the slices its
    tensors cover, without collectives."""
    if targets:
        with _without_collectives_warning():
            dcp.load(targets, storage_reader=_SafeReader(folder), no_dist=True)


def _under(tensors: dict, prefix: str) -> dict:
    """The entries whose keys start with `prefix`, the prefix removed."""
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def load_whole(folder: Path, prefix: str = METHOD) -> dict[str, torch.Tensor]:
    """Whole CPU tensors stored under `prefix` (the method's state dict by default; "" for all), for one process."""
    targets = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
               for key, entry in read_index(folder).items() if key.startswith(prefix)}
    _load(folder, targets)
    return _under(targets, prefix)


def load_whole_state(folder: Path, state: dict) -> dict:
    """{"method", "optimizer"} with whole CPU tensors, laid out as a single-file checkpoint holds them."""
    tensors = load_whole(folder, "")
    return {"method": _under(tensors, METHOD), "optimizer": _optimizer_state(_under(tensors, OPTIMIZER), state)}


def _optimizer_state(tensors: dict, state: dict) -> dict:
    """An `Optimizer.state_dict()` from its tensors ("<parameter index>/<state key>" -> tensor) and the rest."""
    rest = state["optimizer_rest"]
    entries: dict = {}
    for key, value in tensors.items():
        number, name = key.split("/", 1)
        entries.setdefault(int(number), {})[name] = value
    for number, values in rest["state"].items():
        entries.setdefault(int(number), {}).update(values)
    return {"state": entries, "param_groups": rest["param_groups"]}


def load_into(folder: Path, method: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict,
              strict: bool = True) -> _IncompatibleKeys:
    """Put the folder's tensors into `method` (and `optimizer`), each shaped and sharded like the live tensor it
    replaces; raises RuntimeError naming the keys or shapes that do not fit when `strict`."""
    index = read_index(folder)
    live = method.state_dict()
    stored = {key[len(METHOD):]: entry for key, entry in index.items() if key.startswith(METHOD)}
    misfits = [f"{name}: checkpoint {tuple(entry.size)}, model {tuple(live[name].shape)}"
               for name, entry in stored.items() if name in live and tuple(entry.size) != tuple(live[name].shape)]
    if misfits:
        raise RuntimeError(f"size mismatch for {'; '.join(misfits[:4])}")
    keys = _IncompatibleKeys([name for name in live if name not in stored], [name for name in stored
                                                                              if name not in live])
    if strict and (keys.missing_keys or keys.unexpected_keys):
        raise RuntimeError(f"Error(s) in loading state_dict: missing keys {keys.missing_keys[:5]}, unexpected keys "
                           f"{keys.unexpected_keys[:5]}")
    targets = {METHOD + name: torch.empty_like(live[name], dtype=entry.properties.dtype)
               for name, entry in stored.items() if name in live}
    parameters = [p for group in optimizer.param_groups for p in group["params"]] if optimizer is not None else []
    for key, entry in index.items():
        if optimizer is not None and key.startswith(OPTIMIZER):
            number = int(key[len(OPTIMIZER):].split("/")[0])
            like = parameters[number] if number < len(parameters) else None
            targets[key] = (torch.empty_like(like, dtype=entry.properties.dtype)
                            if like is not None and tuple(like.shape) == tuple(entry.size)
                            else torch.empty(tuple(entry.size), dtype=entry.properties.dtype))
    _load(folder, targets)
    method.load_state_dict(_under(targets, METHOD), strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(_optimizer_state(_under(targets, OPTIMIZER), state))
    return keys
