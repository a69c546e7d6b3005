"""One autograd node per block (plain eager training), and the block's forward planned once
per layer and input signature (training and inference).

Every unit called through the registered op gets an autograd node of its own: a basic
block makes two, each a custom Function call forward and a node for the engine to run
backward, and the identity gradient must be carried through the first node to join inside
its BN-backward kernel. In plain eager training a block instead runs its forward glue
(nn._PreActUnits.forward_units, the same code either way) inside one
torch.autograd.Function, BlockFunction. There grad mode is off, so every op runs its body
(checks, backend choice, kernels) with no node of its own, and a Tape records each body's
call of its backend implementation (ops.recording) and what each unit's node would have
saved. BlockFunction's backward runs the recorded units' backward (ops.unit_gradients, the
formula the per-unit node runs too) last unit first, passing each unit's input gradient to
the unit that produced that input and the shortcut's gradient to the first unit's
BN-backward kernel (dx_other). A projection that reads relu(bn1(x)) hands its conv's input
gradient to the first unit's dgrad kernel instead (da_other), so bn1's backward runs once.
A block that drops its residual branch before the shortcut joins it (timm's DropPath:
stochastic depth) returns the branch and the shortcut from its node; the drop module and
the add run in PyTorch after it, and the shortcut's gradient comes back to the node as its
second output's, to join in the same kernel.

What the tape recorded is a Program: the implementation calls with every tensor they read
or wrote as a slot (the block's input, the incoming statistics, the modules' parameters and
buffers, earlier calls' outputs). Given a key that fixes everything the glue decided from
(module settings, autocast, the backend asked for, and the layout of every tensor the
Program gets: dtypes, shapes, strides, devices, 16-byte alignment; nn._PreActUnits.plan_key),
the next call with the same key replays the Program on that call's tensors: the same
implementation calls with the same arguments, without the glue, its checks and its backend
choice (they would decide the same); about half of a small block's forward host time was
that glue (benchmarks.host_cost). Each call is recorded as what its backend bound
(Backend.bind): the triton backend's replays allocate and launch without the wrapper that
derived the launch from the arguments (backends/triton/replay.py), since the key fixes all
but the tensors. The backward is recorded the same way on its first run for each request
of gradients and layout of the incoming gradient and of the saved tensors as unpacked (a
saved-tensor hook may return them laid out anew): its implementation calls and glue steps
(ops.unit_gradients' `call`) on slots (the saved tensors, the incoming gradient, earlier
outputs), which the later backwards replay without the glue. A Program holds slots, not
tensors: PLANS keeps it by key, for every block with that key.

Without autograd recording (inference) the same Tape and plans run without the node.
Where something traces or intercepts (torch.compile, dispatch modes, tensor subclasses) the
blocks keep one registered op per unit. So do the blocks whose glue would cast a tensor
(the unit glue's casts and unfused residual adds have autograd nodes of their own, which
inside a Function's forward nothing would record), `applies`, and those with a weight that
is no registered parameter (a parametrization computes it on every read: nn.block_tensors).
Synchronised BatchNorm records no Program (its glue exchanges statistics between ranks,
which a replay of implementation calls would skip).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import dispatch, ops
from .backends.base import Backend, tf32_convolutions
from .entry import PLAIN_TENSOR_TYPES, intercepted, registered_op_needed


def applies(x: Tensor, params: Sequence[Tensor], conv_weights: Sequence[Tensor], conv_dtype: torch.dtype) -> bool:
    """Whether a block's forward runs on a Tape (recorded, or replayed from a plan):
    nothing intercepts, every tensor is a plain one, and the unit glue casts nothing (x is
    a dtype the kernels read, or add as the identity, and every conv weight is the conv
    dtype or the float32 master copy under autocast). Then it is one BlockFunction where
    autograd records (records_autograd), no node at all where it does not (inference)."""
    if intercepted():
        return False
    if type(x) not in PLAIN_TENSOR_TYPES or any(type(p) not in PLAIN_TENSOR_TYPES for p in params):
        return False
    allowed = ops.residual_dtypes(conv_dtype)
    return x.dtype in allowed and all(w.dtype in (conv_dtype, torch.float32) for w in conv_weights)


def records_autograd(x: Tensor, params: Sequence[Tensor]) -> bool:
    """Grad mode is on and x or a parameter requires grad."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


class BlockInputs(NamedTuple):
    """The tensors a block's forward reads: slots 0.. of its Program, in this order."""
    x: Tensor
    x_moments: Optional[tuple[Tensor, Tensor]]  # the incoming statistics of x (see nn), or None
    params: Sequence[Tensor]   # the parameters the units read: BlockFunction's differentiable inputs
    buffers: Sequence[Optional[Tensor]]  # the BatchNorm buffers they read or update

    def values(self) -> list[Optional[Tensor]]:
        return [self.x, *(self.x_moments or (None, None)), *self.params, *self.buffers]


def layout(t: Tensor) -> tuple:
    """What the keys of plans hold of a tensor they get: dtype, shape, strides, device and
    whether it starts at a 16-byte aligned address (Triton specialises launches on it)."""
    return t.dtype, t.shape, t.stride(), t.device, t.data_ptr() % 16 == 0


def saved_layout(t: Optional[Tensor]) -> Optional[tuple]:
    """What of a saved tensor may differ from the forward's when the backward unpacks it: a
    saved-tensor hook returns the same values (its contract), but may lay them out anew
    (torch.autograd.graph.save_on_cpu(pin_memory=True) gives an NCHW-contiguous copy of a
    channels_last tensor) at another alignment, or in a hook that casts, in another dtype."""
    return None if t is None else (t.stride(), t.dtype, t.data_ptr() % 16 == 0)


SAVED_PER_UNIT = 6  # ops.unit_saved: x, mean, var, bn_weight, bn_bias, weight


class UnitRecord(NamedTuple):
    """One unit of a Program: the slots of what its backward reads (ops.unit_saved), its
    configuration, the slots of the values it read (x, residual) and wrote, and its
    parameters' positions among the block's (None: none)."""
    saved: tuple[Optional[int], ...]
    conf: ops.UnitConf
    input: int
    residual: Optional[int]
    output: int
    params: tuple[Optional[int], Optional[int], Optional[int]]  # bn_weight, bn_bias, weight


class Call(NamedTuple):
    """An implementation call of a Program, on the values of its slots."""
    run: Callable  # run(values): the call, its arguments taken from the slots (on_slots)
    impl: Callable  # what it calls: the implementation, or what its backend bound of it
    args: tuple[tuple[str, Optional[int], object], ...]  # (name, slot or None, constant)
    frees: tuple[int, ...] = ()  # the slots whose tensors it lets go of (a backward's: BackwardTape.finish)


def on_slots(impl: Callable, args: tuple[tuple[str, Optional[int], object], ...]) -> Callable:
    """run(values) -> impl(**arguments), each argument (name, slot, constant) values[slot] or
    the constant (slot None). A call its backend bound may take the values itself
    (Backend.bind); else a dict of arguments is made on every call."""
    if hasattr(impl, "on_slots"):
        return impl.on_slots(args).run
    return functools.partial(_call_by_name, impl, args)


def _call_by_name(impl: Callable, args: tuple, values: list[Optional[Tensor]]):
    return impl(**{name: constant if slot is None else values[slot] for name, slot, constant in args})


def replay(calls: Sequence[Call], values: list[Optional[Tensor]]) -> None:
    """Run the calls on `values` (the inputs' slots filled), appending their outputs."""
    for run, _impl, _args, frees in calls:
        outputs = run(values)
        values.extend(outputs if isinstance(outputs, tuple) else (outputs,))
        for slot in frees:
            values[slot] = None


class Recording:
    """Implementation calls recorded while glue runs, each tensor argument as a slot of
    `values`: one of the inputs it started with, or an output of an earlier call."""

    def __init__(self, values: list[Optional[Tensor]]):
        self.values = values  # holds every tensor recorded, so that no id is reused meanwhile
        self.slot_of = {id(t): slot for slot, t in enumerate(values) if t is not None}
        self.calls: list[Call] = []
        self.made_by: list[int] = []  # per output slot (after the inputs), the index of its call
        self.replayable = True  # every tensor a call read has a slot

    def add(self, call: ops.OpCall) -> None:
        args = []
        for name, value in call.args.items():
            slot = self.slot_of.get(id(value)) if isinstance(value, Tensor) else None
            if slot is None and isinstance(value, Tensor):
                self.replayable = False
            args.append((name, slot, None if slot is not None else value))
        for output in call.outputs:
            if output is not None:
                self.slot_of[id(output)] = len(self.values)
            self.values.append(output)
            self.made_by.append(len(self.calls))
        self.calls.append(Call(on_slots(call.impl, tuple(args)), call.impl, tuple(args)))


class RecordedBackward(NamedTuple):
    """A Program's backward for one request of gradients as calls on slots: the saved
    tensors (Program.saved's list), the outputs' gradients, then the calls' outputs."""
    calls: list[Call]
    x_grad: Optional[int]  # the slot of x's gradient (None: none)
    param_grads: tuple[Optional[int], ...]  # the slot of each parameter's

    def __call__(self, saved: Sequence[Optional[Tensor]], output_grads: Sequence[Optional[Tensor]]):
        values = [*saved, *output_grads]
        replay(self.calls, values)
        return (None if self.x_grad is None else values[self.x_grad],
                [None if slot is None else values[slot] for slot in self.param_grads])


class BackwardTape(Recording):
    """Records a Program's backward while its glue runs (Program.run_units)."""

    def call(self, backend: Backend, fn: Callable, **args):
        """fn(**args), recorded as what `backend` binds of it (ops.unit_gradients' call)."""
        outputs, bound = backend.bind(fn, args)
        self.add(ops.OpCall(backend.name, bound, args, outputs if isinstance(outputs, tuple) else (outputs,)))
        return outputs

    def finish(self, gradients: tuple[Optional[Tensor], list[Optional[Tensor]]]) -> Optional[RecordedBackward]:
        """The recorded backward that returned `gradients` (x's, the parameters'), or None
        where one of them or an argument has no slot. Each call lets go of the outputs it
        reads last, and of its own that nothing reads, but the gradients: as in the glue, a
        gradient of an activation's size lives no longer than its last reader."""
        x_grad, param_grads = gradients
        returned = [x_grad, *param_grads]
        slots = [None if t is None else self.slot_of.get(id(t)) for t in returned]
        if not self.replayable or any(s is None and t is not None for s, t in zip(slots, returned)):
            return None
        last_read = {slot: index for index, call in enumerate(self.calls) for _, slot, _ in call.args}
        frees: list[list[int]] = [[] for _ in self.calls]
        first_output = len(self.values) - len(self.made_by)
        for slot, made_by in enumerate(self.made_by, first_output):
            if slot not in slots:
                frees[max(made_by, last_read.get(slot, made_by))].append(slot)
        calls = [call._replace(frees=tuple(f)) for call, f in zip(self.calls, frees)]
        return RecordedBackward(calls, slots[0], tuple(slots[1:]))


class Program:
    """A block's forward as implementation calls on slots, and its units for the backward."""

    def __init__(self):
        self.calls: list[Call] = []
        self.units: list[UnitRecord] = []
        # The slots of the block's outputs (nn._PreActUnits.forward_units): its output (or its
        # residual branch), and the shortcut that joins the branch after the block's drop
        # module (None: it joined in the last conv's epilogue).
        self.outputs: tuple[int, Optional[int]] = (0, None)
        self.moments: tuple[int, ...] = ()  # the slots of the consumer's statistics, if computed
        self.bn_backward_in: tuple[int, ...] = ()  # per unit, the unit whose BN backward serves it (see finish)
        self.requests: dict[tuple, RecordedBackward] = {}  # the backward per request (see backward)

    @staticmethod
    def values_of(slots: Sequence[Optional[int]], values: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
        return [None if slot is None else values[slot] for slot in slots]

    def saved(self, values: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
        """What the backward reads, unit after unit (ops.unit_saved each)."""
        return [None if slot is None else values[slot] for unit in self.units for slot in unit.saved]

    def backward(self, saved: Sequence[Optional[Tensor]], output_grads: Sequence[Optional[Tensor]],
                 x_needs_grad: bool, param_needs_grad: Sequence[bool]) -> tuple[Optional[Tensor], list]:
        """(x's gradient, each parameter's) given the gradients of the block's outputs (None:
        a zero one), from ctx.saved_tensors (self.saved's list, unpacked). The first backward
        of a request runs the glue (run_units) and records it; the later ones replay that,
        without the glue. A request: the gradients autograd asks for (a model asks the same
        ones step after step), the TF32 setting (which the backward's launches read, as the
        forward's do: the key has it), output_grads' layouts and the saved tensors' as
        unpacked (what the backward gets from outside the plan: a bound replay launches with
        the layouts it was bound with, replay.py)."""
        # The forward's tensors were plain ones (applies): only the incoming gradient, or a
        # mode entered since, can make the ops go through their registered versions.
        if registered_op_needed([g for g in output_grads if g is not None]):
            return self.run_units(saved, output_grads, x_needs_grad, param_needs_grad, None)
        request = (tf32_convolutions(), tuple(None if g is None else layout(g) for g in output_grads),
                   tuple(map(saved_layout, saved)), x_needs_grad, *param_needs_grad)
        recorded = self.requests.get(request)
        if recorded is not None:
            return recorded(saved, output_grads)
        tape = BackwardTape([*saved, *output_grads])
        gradients = self.run_units(saved, output_grads, x_needs_grad, param_needs_grad, tape)
        recorded = tape.finish(gradients)
        if recorded is not None:  # (else the next backward runs the glue, recording, again)
            self.requests[request] = recorded
        return gradients

    def run_units(self, saved: Sequence[Optional[Tensor]], output_grads: Sequence[Optional[Tensor]],
                  x_needs_grad: bool, param_needs_grad: Sequence[bool],
                  tape: Optional[BackwardTape]) -> tuple[Optional[Tensor], list[Optional[Tensor]]]:
        """The backward's glue: each unit's backward (ops.unit_gradients) last unit first,
        each gradient passed on to where its value came from, through the implementations,
        recorded on `tape`, or with tape None through the registered ops (something
        intercepts)."""
        # Which values need a gradient: x as autograd says; a unit's output where its input,
        # its residual or one of its parameters does.
        value_needs = {0: x_needs_grad}
        for unit in self.units:
            value_needs[unit.output] = (value_needs[unit.input]
                                        or (unit.residual is not None and value_needs[unit.residual])
                                        or any(p is not None and param_needs_grad[p] for p in unit.params))
        # The outputs' gradients, where they are not zero and their value needs one (the
        # shortcut may be x itself, for which autograd may want none).
        value_grads: dict[int, Tensor] = {slot: grad for slot, grad in zip(self.outputs, output_grads)
                                          if slot is not None and grad is not None and value_needs[slot]}
        param_grads: list[Optional[Tensor]] = [None] * len(param_needs_grad)
        # The gradient of a shared activation relu(bn(x)) from the later units that read it,
        # by the unit whose BN backward serves them all (ops.unit_gradients).
        activation_grads: dict[int, Tensor] = {}
        for index in reversed(range(len(self.units))):
            unit = self.units[index]
            dy = value_grads.pop(unit.output, None)
            if dy is None:  # (then none waits in activation_grads: what needed x's gradient needed this)
                continue
            needs = (value_needs[unit.input], False, False,
                     *(p is not None and param_needs_grad[p] for p in unit.params),
                     unit.residual is not None and value_needs[unit.residual])
            bn_unit = self.bn_backward_in[index]
            elsewhere = bn_unit != index
            # The gradient later units gave this unit's input joins its dx in the kernel.
            dx_other = None if elsewhere else value_grads.pop(unit.input, None)
            call = (ops.call_directly if tape is None
                    else functools.partial(tape.call, dispatch.get_backend(unit.conf.backend)))
            dx, dgamma, dbeta, dweight, dresidual = ops.unit_gradients(
                saved[index * SAVED_PER_UNIT:(index + 1) * SAVED_PER_UNIT], unit.conf, needs, dy, dx_other,
                ops.backward_ops(unit.conf.backend, tape is None), da_other=activation_grads.pop(bn_unit, None),
                bn_elsewhere=elsewhere, call=call)
            if elsewhere:
                if dx is not None:  # the activation's gradient, joined with the others in bn_unit's dgrad
                    activation_grads[bn_unit] = dx
                dx = None
            for key, grad in ((unit.input, dx), (unit.residual, dresidual)):
                if grad is not None:  # += (a missing entry is zero)
                    current = value_grads.get(key)
                    value_grads[key] = grad if current is None else call(ops.add, a=current, b=grad)
            for position, grad in zip(unit.params, (dgamma, dbeta, dweight)):
                if grad is not None:  # a parameter two units read (a shared module) gets the sum
                    current = param_grads[position]
                    param_grads[position] = grad if current is None else call(ops.add, a=current, b=grad)
        return value_grads.get(0), param_grads


class Tape(Recording):
    """Records a Program while a block's forward glue runs (the ops.Recorder of its op bodies)."""

    def __init__(self, inputs: BlockInputs):
        super().__init__(inputs.values())
        self.param_of = {id(p): i for i, p in enumerate(inputs.params)}
        self.program = Program()
        self.last_backend = ""  # the backend of the latest call

    def add(self, call: ops.OpCall) -> None:
        super().add(call)
        self.last_backend = call.backend

    def run_unit(self, args: tuple) -> tuple[Tensor, Tensor, Tensor]:
        """bn_relu_conv's body on `args` (its arguments, positional), its unit recorded."""
        outputs = ops.bn_relu_conv.body(*args)  # recorded: BlockFunction's forward runs under ops.recording
        x, _mean, _var, bn_weight, bn_bias, weight, residual = args[:7]
        self.program.units.append(UnitRecord(
            tuple(None if t is None else self.slot_of[id(t)] for t in ops.unit_saved(args)),
            ops.unit_conf(args, self.last_backend), self.slot_of[id(x)],
            None if residual is None else self.slot_of[id(residual)], self.slot_of[id(outputs[0])],
            tuple(None if p is None else self.param_of[id(p)] for p in (bn_weight, bn_bias, weight))))
        return outputs

    def finish(self, outputs: tuple[Tensor, Optional[Tensor]], moments: Optional[tuple[Tensor, Tensor]]) -> Program:
        self.program.calls = self.calls
        self.program.outputs = tuple(None if output is None else self.slot_of[id(output)] for output in outputs)
        self.program.moments = () if moments is None else tuple(self.slot_of[id(m)] for m in moments)
        # Units that apply the same BatchNorm to the same x (the same x, statistics, affine
        # parameters, eps and use of batch statistics: a projection shortcut and the first
        # unit) share one BN backward, the first one's; a unit without a BN has its own.
        first_with: dict[tuple, int] = {}
        self.program.bn_backward_in = tuple(
            index if unit.saved[1] is None
            else first_with.setdefault((unit.saved[:5], unit.conf.eps, unit.conf.batch_stats), index)
            for index, unit in enumerate(self.program.units))
        return self.program


class Plans:
    """Programs by key (nn._PreActUnits.plan_key), at most `size` of them (emptied when full:
    a model has a few block signatures, and a key that keeps changing gains nothing)."""

    def __init__(self, size: int = 512):
        self.size, self.programs = size, {}

    def get(self, key) -> Optional[Program]:
        return None if key is None else self.programs.get(key)

    def put(self, key, program: Program) -> None:
        if key is None:
            return
        if len(self.programs) >= self.size:
            self.programs.clear()
        self.programs[key] = program


PLANS = Plans()


def execute(forward_units: Callable, key, program: Optional[Program], inputs: BlockInputs):
    """The block's forward: program None runs forward_units(x, tape) (the block's glue,
    returning (outputs, moments): Program.outputs' values, and the consumer's (mean, var)
    or None), records it and keeps the Program in PLANS under `key` (None: keeps none);
    else replays `program`.
    Returns (the Program that ran, the values of its slots). Runs on x's device
    (ops.other_cuda_device): a replay's bound launches take none of the ops' own steps."""
    device = ops.other_cuda_device(inputs.x)
    if device is not None:
        with torch.cuda.device(device):
            return execute(forward_units, key, program, inputs)
    if program is None:
        tape = Tape(inputs)
        with ops.recording(tape):
            outputs, moments = forward_units(inputs.x, tape)
        program = tape.finish(outputs, moments)
        if tape.replayable:
            PLANS.put(key, program)
        return program, tape.values
    values = inputs.values()
    replay(program.calls, values)
    return program, values


class BlockFunction(torch.autograd.Function):
    """A block's forward as one autograd node (see the module docstring).

    forward(ctx, run, x, *params): `execute` with the arguments in `run` (a BlockRun, one
    argument: each argument of a Function call is host work), where run.inputs holds x and
    params too. Returns (*outputs, *moments): Program.outputs' values (the second may be None).
    """

    @staticmethod
    def forward(ctx, run: "BlockRun", x: Tensor, *params: Tensor):
        program, values = execute(*run)
        moments = tuple(values[m] for m in program.moments)
        ctx.save_for_backward(*program.saved(values))
        ctx.program = program
        ctx.set_materialize_grads(False)
        if moments:
            ctx.mark_non_differentiable(*moments)
        return (*program.values_of(program.outputs, values), *moments)

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]):
        output_grads = grads[:2]  # the outputs' (the moments' are None: not differentiable)
        if all(g is None for g in output_grads):
            return (None,) * len(ctx.needs_input_grad)
        needs = ops.gradients_used(ctx, range(1, len(ctx.needs_input_grad)))  # run, x, *params: tensors but run
        ops.check_no_double_backward()
        dx, param_grads = ctx.program.backward(ctx.saved_tensors, output_grads, needs[1], needs[2:])
        return (None, dx if needs[1] else None, *param_grads)


class BlockRun(NamedTuple):
    """`execute`'s arguments, as BlockFunction takes them."""
    forward_units: Callable
    key: object
    program: Optional[Program]
    inputs: BlockInputs


def run_block(forward_units: Callable, key, program: Optional[Program], inputs: BlockInputs):
    """The block's (outputs, moments) as forward_units returns them: through one
    BlockFunction where autograd records, else `execute` alone (inference: no node)."""
    if records_autograd(inputs.x, inputs.params):
        output, shortcut, *moments = BlockFunction.apply(BlockRun(forward_units, key, program, inputs), inputs.x,
                                                         *inputs.params)
    else:
        program, values = execute(forward_units, key, program, inputs)
        output, shortcut = program.values_of(program.outputs, values)
        moments = [values[m] for m in program.moments]
    return (output, shortcut), (tuple(moments) if moments else None)
