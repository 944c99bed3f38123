"""The converter contract, checked by behaviour on a small real model.

:func:`check_converter` runs every rule of :data:`RULES` in turn on one model:

1. the options validate and list (``options-validate-and-list``);
2. an instance registers with :class:`~ckpt_core.ConverterSet` (``composes``);
3. on the unconverted model ``key_filter`` claims nothing; after ``convert`` it
   claims every key ``convert`` added, and the ``base`` view holds exactly the
   unconverted model's keys;
4. one optimizer step (seeded gradients) and ``post_optimizer_step`` make every
   trainable tensor differ from its initial value; ``state_dict_transform`` then
   leaves its input and the model untouched and gives the same output twice;
5. each state-dict adapter the converter returns round-trips the keys it owns;
6. the HF export written by :func:`ckpt_core.policy.exporter.write_export` (dtypes
   kept) reads back through the adapters into the export view, bit for bit;
7. a save through :class:`~ckpt_core.CheckpointManager` and a load into a fresh,
   differently seeded model restore the ``full`` view and the optimizer state bit
   for bit.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from ckpt_core.errors import CkptError, first_of
from ckpt_core.protocol.plugin_host import ConverterSet, split_list_options
from ckpt_core.protocol.state_dict_adapter import StateDictAdapter

#: Rule id → what the rule demands. Every failure message starts with ``[<id>]``.
RULES: dict[str, str] = {
    "options-validate-and-list": "the options validate (defaults load; unknown and mistyped "
    "options are refused) and list, each with a description",
    "composes": "an instance registers with ConverterSet under its name",
    "key_filter-claims-nothing-before-convert": "key_filter claims no key of the unconverted model",
    "key_filter-claims-added-keys": "key_filter claims every key that convert adds to the full "
    "view",
    "convert-keeps-model-keys": "after convert, the base view holds exactly the unconverted "
    "model's keys",
    "transform-does-not-mutate": "state_dict_transform leaves its input tensors and the model "
    "unchanged",
    "transform-is-deterministic": "state_dict_transform gives the same output for the same input",
    "adapter-round-trips": "the converter's state-dict adapter gives back, through from_hf, "
    "what it took through to_hf",
    "export-loads-back": "the HF export reads back through the adapters into the export view",
    "save-load-bit-exact": "a save and a load through CheckpointManager restore the model and "
    "optimizer bit-exactly",
}

#: What ``model_factory`` returns: a model, or a model and its state-dict adapter.
ModelFactory = Callable[[], "nn.Module | tuple[nn.Module, StateDictAdapter | None]"]

_NOT_AN_OPTION = "definitely_not_an_option"


def check_converter(
    name_or_class: str | type,
    model_factory: ModelFactory | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    model: str = "llama:tiny",
) -> None:
    """Check one converter against the contract; raise :class:`AssertionError` naming a rule.

    Args:
        name_or_class: an installed converter's name (found through its entry
            point, as a run finds it) or the converter class itself.
        model_factory: builds the model to convert, with its state-dict adapter
            (``model`` or ``(model, adapter)``); called twice, under different
            seeds. Default: the ``model`` family's flavor.
        options: the converter's options (its ``[converters.<name>]`` table).
        model: ``family:flavor`` of an installed model family, used when
            ``model_factory`` is ``None`` (default the reference ``llama:tiny``).
    """
    subject = _Subject(name_or_class, options)
    subject.check_options()
    factory = model_factory if model_factory is not None else family_factory(model)
    with tempfile.TemporaryDirectory(prefix="ckpt-contract-") as tmp:
        _Run(subject, factory, tmp).check()


def family_factory(spec: str) -> Callable[[], tuple[nn.Module, StateDictAdapter]]:
    """A factory building ``family:flavor`` (e.g. ``llama:tiny``) and its adapter."""
    from ckpt_core.content.families import model_family

    family_name, _, flavor = spec.partition(":")
    family = model_family(family_name)
    if family.config_for is None or not flavor:
        raise ValueError(f"model={spec!r}: give family:flavor of a family with flavors.")
    config = family.config_for(flavor)

    def build() -> tuple[nn.Module, StateDictAdapter]:
        return family.build_model(config), family.adapter(config)

    return build


def _fail(rule: str, who: str, detail: str) -> AssertionError:
    return AssertionError(f"[{rule}] converter {who!r}: {RULES[rule]}; {detail}")


def _show(keys: list[str], limit: int = 5) -> str:
    return first_of(sorted(keys), limit)


class _Subject:
    """The converter under test: its class, its name and how a run builds it."""

    def __init__(self, name_or_class: str | type, options: Mapping[str, Any] | None) -> None:
        self.options = dict(options or {})
        if isinstance(name_or_class, str):
            from ckpt_core.protocol.discovery import discover_converters

            entries = discover_converters()
            if name_or_class not in entries:
                raise _fail(
                    "composes",
                    name_or_class,
                    f"no converter of that name is installed (installed: "
                    f"{', '.join(sorted(entries)) or 'none'}); pip install your distribution "
                    "or pass the class",
                )
            self.by_name = True
            self.name = name_or_class
            self.cls = entries[name_or_class].load()
            if getattr(self.cls, "name", None) != self.name:
                raise _fail(
                    "composes",
                    self.name,
                    f"the class's name is {getattr(self.cls, 'name', None)!r}, its entry "
                    f"point's {self.name!r}: they must be equal",
                )
        else:
            self.by_name = False
            self.cls = name_or_class
            self.name = str(getattr(name_or_class, "name", name_or_class))

    def build(self) -> ConverterSet:
        """The enabled converter as a run gets it (``ConverterSet.from_config`` for a name)."""
        if self.by_name:
            return ConverterSet.from_config([self.name], {self.name: self.options})
        config = self.cls.Config(**split_list_options(self.cls.Config, self.options))
        try:
            return ConverterSet([self.cls(config)])
        except CkptError as exc:
            raise _fail("composes", self.name, str(exc)) from exc

    def check_options(self) -> None:
        """``options-validate-and-list``: defaults, refusals, descriptions and the listing."""
        rule, who = "options-validate-and-list", self.name
        config_cls = getattr(self.cls, "Config", None)
        if not (isinstance(config_cls, type) and issubclass(config_cls, BaseModel)):
            raise _fail(rule, who, f"Config is {config_cls!r}, not a pydantic model")
        try:
            config_cls()
        except ValidationError as exc:
            raise _fail(rule, who, f"an option has no valid default: {exc}") from exc
        for field_name, field in config_cls.model_fields.items():
            if not field.description:
                raise _fail(rule, who, f"option {field_name!r} has no description")
            if field.annotation is Any:
                continue
            try:
                config_cls(**{field_name: object()})
            except ValidationError:
                pass
            else:
                raise _fail(rule, who, f"option {field_name!r} accepted an object() as its value")
        self._check_unknown_refused(rule)
        from ckpt_core.cli.plugins_cmd import collect, describe_options

        listed = [o["name"] for o in describe_options(config_cls)]
        if listed != list(config_cls.model_fields):
            raise _fail(rule, who, f"listed options {listed} differ from the model's fields")
        if self.by_name:
            record = next((r for r in collect() if r["name"] == self.name), None)
            if record is None or "error" in record:
                error = record.get("error") if record else "not listed"
                raise _fail(rule, who, f"`ckpt plugins` does not list it: {error}")
            if [o["name"] for o in record["options"]] != listed:
                raise _fail(rule, who, "`ckpt plugins` lists other options than the Config")

    def _check_unknown_refused(self, rule: str) -> None:
        if self.by_name:
            try:
                ConverterSet.from_config([self.name], {self.name: {_NOT_AN_OPTION: 1}})
            except CkptError as exc:
                if _NOT_AN_OPTION not in str(exc):
                    raise _fail(
                        rule, self.name, f"the refusal does not name the option: {exc}"
                    ) from exc
                return
        else:
            try:
                self.cls.Config(**{_NOT_AN_OPTION: 1})
            except ValidationError:
                return
        raise _fail(rule, self.name, f"the unknown option {_NOT_AN_OPTION!r} was accepted")


class _Run:
    """One model converted by the subject, checked rule by rule."""

    def __init__(self, subject: _Subject, factory: ModelFactory, tmp: str) -> None:
        self.subject, self.factory, self.tmp = subject, factory, tmp
        self.who = subject.name

    def build_model(self, seed: int) -> tuple[nn.Module, StateDictAdapter]:
        torch.manual_seed(seed)
        made = self.factory()
        model, adapter = made if isinstance(made, tuple) else (made, None)
        return model, adapter if adapter is not None else SameNamesAdapter()

    def check(self) -> None:
        from ckpt_core.content.model_wrapper import ModelWrapper

        model, self.adapter = self.build_model(seed=0)
        before = set(ModelWrapper(model).state_dict("full"))
        self.convs = self.subject.build()
        claimed = [k for k in before if self.convs.key_filter(k)]
        if claimed:
            raise _fail(
                "key_filter-claims-nothing-before-convert",
                self.who,
                f"it claims {_show(claimed)} of the model before convert",
            )
        self.convs.convert(model)
        self.model = model
        self.wrapper = ModelWrapper(model, converters=self.convs)
        self.check_keys(before)
        self.optimizer = self.train_one_step(model, self.convs)
        export = self.check_transform()
        self.check_adapters(export)
        self.check_export(export)
        self.check_save_load()

    # -- rules ------------------------------------------------------------------

    def check_keys(self, before: set[str]) -> None:
        full = set(self.wrapper.state_dict("full"))
        base = set(self.wrapper.state_dict("base"))
        gone = sorted(before - base)
        if gone:
            raise _fail(
                "convert-keeps-model-keys",
                self.who,
                f"the base view lacks {_show(gone)} (renamed by convert, or claimed by "
                "key_filter after convert)",
            )
        unclaimed = [k for k in full - before if not self.convs.key_filter(k)]
        if unclaimed:
            raise _fail(
                "key_filter-claims-added-keys",
                self.who,
                f"convert added {_show(unclaimed)}, which key_filter does not claim (the base "
                "view and HF loads would expect them in a base model)",
            )

    def check_transform(self) -> dict[str, Any]:
        live = _snapshot(self.model.state_dict())
        full = self.wrapper.state_dict("full")
        given = _snapshot(full)
        first = self.convs.state_dict_transform(dict(full))
        changed = [k for k in given if not _same(full[k], given[k])]
        changed += [k for k, v in self.model.state_dict().items() if not _same(v, live.get(k))]
        if changed:
            raise _fail(
                "transform-does-not-mutate",
                self.who,
                f"{_show(sorted(set(changed)))} changed in place (build new tensors instead)",
            )
        first = _snapshot(first)
        second = self.convs.state_dict_transform(dict(self.wrapper.state_dict("full")))
        differ = _differences(first, second)
        if differ:
            raise _fail("transform-is-deterministic", self.who, f"two calls differ: {differ}")
        return first

    def check_adapters(self, export: dict[str, Any]) -> None:
        full = self.wrapper.state_dict("full")
        for name, adapter in self.convs.state_dict_adapters(self.adapter).items():
            for view, entries in (("full", full), ("export", export)):
                owned = {k: v for k, v in entries.items() if self.convs.owner(k) == name}
                if not owned:
                    continue
                back = adapter.from_hf(dict(adapter.to_hf(dict(owned))))
                differ = _differences(owned, back)
                if differ:
                    raise _fail(
                        "adapter-round-trips",
                        self.who,
                        f"{type(adapter).__name__} on the {view} view's owned keys: {differ}",
                    )

    def check_export(self, export: dict[str, Any]) -> None:
        from ckpt_core.policy.exporter import write_export

        rule = "export-loads-back"
        path = os.path.join(self.tmp, "export", "step-1")
        try:
            write_export(
                self.wrapper,
                path,
                fmt="hf",
                dtype=None,
                sd_adapter=self.adapter,
                converters=self.convs,
                step=1,
            )
        except CkptError as exc:
            raise _fail(rule, self.who, f"the HF export failed: {exc}") from exc
        with open(os.path.join(path, "config.json")) as f:
            if not isinstance(json.load(f), dict):
                raise _fail(rule, self.who, "config.json is not a JSON object")
        adapters = self.convs.state_dict_adapters(self.adapter)
        full = self.wrapper.state_dict("full")
        model_files = _read_folder(path)
        routed: dict[str | None, dict[str, Any]] = {}
        for key, value in export.items():
            owner = self.convs.owner(key)
            adapter = adapters.get(owner) if owner else None
            if adapter is not None and adapter.subfolder is not None:
                continue  # written from the full view into the adapter's own folder
            routed.setdefault(owner if adapter is not None else None, {})[key] = value
        for owner, part in sorted(routed.items(), key=lambda kv: kv[0] is None):
            adapter = self.adapter if owner is None else adapters[owner]
            names = set(adapter.to_hf(dict(part))) if owner is not None else set(model_files)
            read = {n: model_files.pop(n) for n in names if n in model_files}
            self._compare_back(adapter, part, read, "model files")
        for name, adapter in adapters.items():
            if adapter.subfolder is None:
                continue
            owned = {k: v for k, v in full.items() if self.convs.owner(k) == name}
            folder = os.path.join(path, adapter.subfolder)
            if not owned:
                continue
            self._compare_back(adapter, owned, _read_folder(folder), f"{adapter.subfolder}/")

    def _compare_back(
        self, adapter: StateDictAdapter, expected: dict[str, Any], read: dict[str, Any], where: str
    ) -> None:
        rule = "export-loads-back"
        try:
            back = adapter.from_hf(dict(read))
        except CkptError as exc:
            raise _fail(
                rule, self.who, f"{type(adapter).__name__}.from_hf of {where}: {exc}"
            ) from exc
        unexpected = sorted(set(back) - set(expected))
        if unexpected:
            raise _fail(rule, self.who, f"{where} read back as unknown keys {_show(unexpected)}")
        # A key the adapter itself drops on the way back (a tied lm_head) is not lost.
        kept = set(adapter.from_hf(dict(adapter.to_hf(dict(expected)))))
        missing = sorted(k for k in expected if k not in back and k in kept)
        if missing:
            raise _fail(rule, self.who, f"{where} lack {_show(missing)}")
        differ = _differences({k: expected[k] for k in back}, back)
        if differ:
            raise _fail(rule, self.who, f"{where}: {differ}")

    def check_save_load(self) -> None:
        from ckpt_core.config import CheckpointConfig
        from ckpt_core.policy.manager import CheckpointManager

        rule = "save-load-bit-exact"
        config = CheckpointConfig(
            folder=os.path.join(self.tmp, "checkpoints"),
            interval=1,
            export={"enable": False},
            preflight="off",
            sign_key=None,
            verify_key=None,
        )
        manager = CheckpointManager(
            config,
            self.model,
            optimizers=self.optimizer,
            converters=self.convs,
            sd_adapter=self.adapter,
        )
        manager.train_state.step = 1
        try:
            manager.save(1, last_step=True)
        except CkptError as exc:
            raise _fail(rule, self.who, f"the save failed: {exc}") from exc
        finally:
            manager.close()
        saved = _snapshot(self.wrapper.state_dict("full"))
        saved_optim = _snapshot(_flat_optimizer_state(self.optimizer))

        model, adapter = self.build_model(seed=1)
        convs = self.subject.build()
        convs.convert(model)
        optimizer = _optimizer(model)
        fresh = CheckpointManager(
            config, model, optimizers=optimizer, converters=convs, sd_adapter=adapter
        )
        try:
            if not fresh.load():
                raise _fail(rule, self.who, "load() found no checkpoint after save(1)")
        except CkptError as exc:
            raise _fail(rule, self.who, f"the load failed: {exc}") from exc
        finally:
            fresh.close()
        from ckpt_core.content.model_wrapper import ModelWrapper

        differ = _differences(saved, ModelWrapper(model, converters=convs).state_dict("full"))
        if differ:
            raise _fail(rule, self.who, f"model: {differ}")
        differ = _differences(saved_optim, _flat_optimizer_state(optimizer))
        if differ:
            raise _fail(rule, self.who, f"optimizer: {differ}")

    # -- helpers ----------------------------------------------------------------

    @staticmethod
    def train_one_step(model: nn.Module, convs: ConverterSet) -> torch.optim.Optimizer:
        """One AdamW step on seeded gradients, then ``post_optimizer_step``."""
        optimizer = _optimizer(model)
        gen = torch.Generator().manual_seed(1234)
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point():
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                param.grad = noise.to(dtype=param.dtype, device=param.device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        convs.post_optimizer_step([model])
        return optimizer


class SameNamesAdapter(StateDictAdapter):
    """A model adapter that keeps native names (for models given without one)."""

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return dict(state_dict)

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        return dict(hf_state_dict)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    return torch.optim.AdamW(params, lr=1e-2)


def _flat_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            out[f"{index}.{name}"] = value
    return out


def _read_folder(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(load_file(file))
    return out


def _snapshot(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _same(a: Any, b: Any) -> bool:
    """Bit-exact equality of tensors (dtype, shape and bytes); ``==`` for the rest."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return a == b


def _differences(expected: Mapping[str, Any], got: Mapping[str, Any]) -> str:
    """'' when equal; else what differs: missing and extra keys, then unequal values."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        parts = [f"missing {_show(missing)}"] if missing else []
        parts += [f"unexpected {_show(extra)}"] if extra else []
        return "; ".join(parts)
    unequal = [k for k in expected if not _same(expected[k], got[k])]
    if unequal:
        return f"values differ for {_show(unequal)}"
    return ""
