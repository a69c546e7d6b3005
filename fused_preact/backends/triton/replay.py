"""A call of a triton-backend implementation bound for replay: its outputs allocated and its
kernels launched again without the wrapper that derived them (block_autograd's plans
replay a block's calls step after step).

A wrapper (conv_fwd.bn_relu_conv, ...) derives what its launches take from its arguments:
tiles and grids from the shapes, strides, constexpr flags from which arguments are given,
dtypes; Triton then specialises the launch on the same things and on each tensor's 16-byte
alignment (launch.KernelLauncher's signature). A plan replays each call with the same
constants and with tensors laid out as before: its keys hold the layout (dtype, shape,
strides, device, alignment) of every tensor it gets from outside, and every other tensor it
passes is allocated the same way every time (PyTorch's allocators align to 64 bytes or
more). So all of that comes out the same every time: only the tensors differ. `bind`
watches one call (the launches it makes, launch.capturing) and keeps each launch's
arguments with the tensors taken out; the BoundCall it returns allocates fresh outputs laid
out as the wrapper's were and launches with the new tensors put in, the kept
CompiledKernel directly (no signature to build). Called with tensors laid out otherwise it
would launch wrongly: it is for a caller that guarantees the layout, as the plans do.

It binds only what it can show to be the same: every tensor a launch takes must be one of
the call's tensor arguments, one of its outputs (fresh tensors, not views), a kept merge
buffer (merge.merge_buffers, taken again for the current stream), or made from an argument
by launch.derived (a default-layout weight copied into the kernels' layout: made again on
every replay); anything else leaves the call to its wrapper. A compiled kernel is launched
only on the device it was chosen on (else the wrapper runs).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from triton.runtime import driver

from . import launch, merge

ARG, OUTPUT, BUFFER, DERIVED = range(4)  # where a launch's tensor comes from


class BoundLaunch(NamedTuple):
    """One launch of a bound call: its arguments with the tensors taken out, and where each
    comes from."""
    launcher: launch.KernelLauncher
    grid: tuple
    template: list  # every parameter's value, None where a tensor goes
    tensors: tuple[tuple[int, int, object], ...]  # (position, ARG / OUTPUT / BUFFER / DERIVED, name / index)
    compiled: object  # the CompiledKernel Triton chose, or None (the interpreter)


class BoundCall:
    """impl(**args) for arguments laid out as those it was bound with (see the module)."""

    def __init__(self, impl: Callable, outputs: list, tuple_result: bool, launches: list[BoundLaunch],
                 buffers: Optional[tuple], derived: list, device: Optional[int], slots: Optional[tuple] = None):
        self.impl = impl
        self.outputs = outputs  # (size, stride, dtype, device) of each output
        self.tuple_result = tuple_result
        self.launches = launches
        self.buffers = buffers  # (device, counters, partials, dtype) of merge_buffers, or None
        self.derived = derived  # (argument, make) of each tensor launch.derived made
        self.device = device  # the current device the compiled kernels were chosen on
        # None: the arguments come by name; else they come as a list of values (run), and
        # these are the (name, index or None, constant) to call impl with (on_slots).
        self.slots = slots

    def __call__(self, **args):
        return self.run(args)

    def run(self, arguments):
        """The call on `arguments`: a dict by name, or after on_slots the list of values."""
        if self.device is not None and driver.active.get_current_device() != self.device:
            return self.impl(**self.keywords(arguments))
        outputs = [torch.empty_strided(size, stride, dtype=dtype, device=device)
                   for size, stride, dtype, device in self.outputs]
        sources = (arguments, outputs, merge.merge_buffers(*self.buffers) if self.buffers else (),
                   [make(arguments[argument]) for argument, make in self.derived])
        for bound in self.launches:
            values = bound.template.copy()
            for position, source, key in bound.tensors:
                values[position] = sources[source][key]
            bound.launcher.launch_values(bound.grid, values, bound.compiled)
        return tuple(outputs) if self.tuple_result else outputs[0]

    def keywords(self, arguments) -> dict:
        if self.slots is None:
            return arguments
        return {name: constant if index is None else arguments[index] for name, index, constant in self.slots}

    def on_slots(self, slots: tuple[tuple[str, Optional[int], object], ...]) -> "BoundCall":
        """This call taking its arguments from a list of values (run(values)), argument
        `name` at values[index] for each (name, index, constant) of `slots` (index None: the
        constant): no dict of arguments to build per call (block_autograd's plans)."""
        index_of = {name: index for name, index, _ in slots}
        launches = [bound._replace(tensors=tuple((position, source, index_of[key] if source == ARG else key)
                                                 for position, source, key in bound.tensors))
                    for bound in self.launches]
        derived = [(index_of[name], make) for name, make in self.derived]
        return BoundCall(self.impl, self.outputs, self.tuple_result, launches, self.buffers, derived, self.device,
                         slots)


def bind(impl: Callable, args: dict):
    """(impl(**args), what replays it: a BoundCall, or impl itself where the call cannot be
    bound)."""
    with launch.capturing() as capture:
        result = impl(**args)
    bound = _bound_call(impl, args, result, capture)
    return result, impl if bound is None else bound


def _bound_call(impl: Callable, args: dict, result, capture: launch.Capture) -> Optional[BoundCall]:
    outputs = result if isinstance(result, tuple) else (result,)
    if not capture.launches or any(not isinstance(t, torch.Tensor) or t._base is not None for t in outputs):
        return None
    source_of = {id(value): (ARG, name) for name, value in args.items() if isinstance(value, torch.Tensor)}
    for index, output in enumerate(outputs):
        if id(output) in source_of:
            return None  # an argument returned, or an output twice
        source_of[id(output)] = (OUTPUT, index)
    buffers, launches, devices, derived = None, [], set(), []
    for launcher, grid, values, compiled in capture.launches:
        if values is None:
            return None
        template, tensors = list(values), []
        for position, value in enumerate(values):
            if not isinstance(value, torch.Tensor):
                continue
            source = source_of.get(id(value))
            if source is None and id(value) in capture.derived:
                made_from, make = capture.derived[id(value)]
                if source_of.get(id(made_from), (None,))[0] != ARG:
                    return None
                source = source_of[id(value)] = (DERIVED, len(derived))
                derived.append((source_of[id(made_from)][1], make))
            if source is None:
                kept = merge.kept_for(value)
                if kept is None or (buffers is not None and buffers != kept[0]):
                    return None  # a tensor the wrapper made besides its outputs
                buffers, source = kept[0], (BUFFER, kept[1])
            template[position] = None
            tensors.append((position, *source))
        if compiled is not None:
            devices.add(driver.active.get_current_device())
        launches.append(BoundLaunch(launcher, grid, template, tuple(tensors), compiled))
    return BoundCall(impl, [(t.shape, t.stride(), t.dtype, t.device) for t in outputs], isinstance(result, tuple),
                     launches, buffers, derived, devices.pop() if devices else None)
