"""``RetrofitConfig``: what ``kallm.retrofit`` does to a model, and what ``config.json`` stores as ``kan_config``.

A ``RetrofitConfig`` is written by a user (which blocks, basis, degree, ...) and completed by
``kallm.retrofit`` (the model's structure, the sizes it resolved, how blocks were chosen); the
completed config, as ``to_dict()``, is the ``kan_config`` of a retrofitted model's config. Loading
reads it back with ``from_dict``, which checks every field by type and value and upgrades the dicts
older kallm versions saved (schema versions 1 to 3). See docs/checkpoint-format.md.

Part of kallm's portable core: plain torch + transformers, sibling imports only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .function_layers import ChannelFunctions, check_layout
from .layers import INPUT_MAPS, KANFeedForward, check_base, check_size, is_int

SCHEMA_VERSION = 4
KINDS = ("kan", "linear")
#: what replaces a feedforward: a two-layer KAN (``"kan"``, the research's form); the MLP's own projections with
#: learnable functions on its activation and up channel that start at zero (``"glu"``, see function_layers.py); or a
#: gated KAN, ``down(silu(gate(x)) * up(x))`` with three KAN layers (``"gated"``, see layers.py)
FORMS = ("kan", "glu", "gated")
INITS = ("random", "fit")
#: ``blocks="auto"``: retrofit the ``num_blocks`` blocks that fit init replaces with the lowest error
AUTO = "auto"
#: settings one block may set for itself (``blocks={25: {"degree": 3}}``)
BLOCK_SETTINGS = ("basis", "degree", "intermediate_size", "input_map", "bias", "base", "basis_options")
#: fields ``retrofit`` fills in from the model and its architecture description
MODEL_FIELDS = ("base_model_type", "base_model", "blocks_path", "mlp_attribute", "bypassed_attributes", "hidden_size",
                "mlp_layout")
#: KAN feedforward settings that ``form="glu"`` has no use for (it keeps the MLP's projections)
KAN_FORM_SETTINGS = ("intermediate_size", "input_map", "bias", "base")
#: KANLinear arguments that place tensors; a config never carries them (the model's dtype and device rule)
PLACEMENT_OPTIONS = ("device", "dtype")
#: KANLinear options that are fields of their own rather than basis options
_LAYER_FIELDS = ("input_map", "bias", "base")


@dataclass
class RetrofitConfig:
    """How to retrofit a causal LM with KAN feedforwards, in the style of PEFT's ``LoraConfig``.

    Which blocks (decoder block indices; negative ones count from the end):
        blocks: a list of indices; or a dict ``{index: settings}`` giving blocks settings of their own
            (``{25: {"degree": 3}, 26: {}}``; keys of ``settings``: ``BLOCK_SETTINGS``); or ``"auto"``:
            fit every candidate block (``init="fit"``) and keep the ``num_blocks`` with the lowest fit
            error (``selection`` records the errors and the choice). ``None``: the last ``last_n`` blocks.
        last_n: how many final blocks to retrofit when ``blocks`` is None.
        num_blocks: how many blocks ``blocks="auto"`` keeps.

    What each KAN feedforward (``hidden -> intermediate_size -> hidden``) is:
        basis, degree: basis spec and degree (``kallm.KANLinear``).
        intermediate_size: its inner size; None: the largest within half the parameters of the MLP it replaces.
        input_map: ``"affine"`` or ``"tanh"``; bias: whether its layers have biases.
        base: None (no base branch: the research's form), or ``"silu"``/``"linear"``: every KAN layer also adds a
            matrix times ``silu(x)`` (or ``x``) of its input, as in pykan and efficient-kan (``kallm.KANLinear``).
        basis_options: options of the basis (``alpha``, ``grid_size``, ...).

    How:
        form: ``"kan"`` (the KAN feedforward above, the research's form); ``"gated"``: the KAN feedforward with a
            third KAN layer that gates the first, ``down(silu(gate(x)) * up(x))`` like a SwiGLU MLP (the default
            size still keeps it within half the MLP's parameters; with ``base="linear"`` and ``init="fit"`` it
            starts as the MLP's most important channels, see docs/kan-learning.md); or ``"glu"``: the MLP keeps
            its projections and its
            activation (and a gated MLP's up channel) gains learnable univariate functions of ``basis`` and
            ``degree``, zero at the start, so the model starts exactly at the original (docs/retrofitting.md).
            ``intermediate_size`` is then the MLP's channel count, filled in by ``retrofit``.
        function_groups: ``form="glu"``: None gives every channel its own function; ``G`` makes groups of
            channels share one (``G`` must divide the channel count).
        kind: ``"kan"``, or ``"linear"``: the research's linear-restart baseline (the chosen MLPs keep their
            shape and get fresh weights; the KAN settings above must keep their defaults).
        init: ``"random"`` or ``"fit"`` (function-preserving, see docs/fit-init.md); None in configs saved
            before kallm recorded it.

    Filled in by ``retrofit`` (a user leaves them None): ``base_model_type``, ``base_model``, ``blocks_path``,
    ``mlp_attribute``, ``bypassed_attributes``, ``hidden_size``, ``mlp_layout`` (``form="glu"``: the MLP's parts
    by role, see ``function_layers.LAYOUT_ROLES``; empty when ``mlp_attribute`` is the activation itself), the
    resolved ``blocks`` list and ``block_settings`` (``{index: settings}``), and ``selection`` (what
    ``blocks="auto"`` measured and chose).
    """

    blocks: list[int] | dict[int, dict] | str | None = None
    last_n: int | None = 5
    num_blocks: int | None = None
    basis: str = "cheby2"
    degree: int = 2
    intermediate_size: int | None = None
    input_map: str = "affine"
    bias: bool = True
    base: str | None = None
    basis_options: dict[str, Any] = field(default_factory=dict)
    kind: str = "kan"
    form: str = "kan"
    function_groups: int | None = None
    init: str | None = "random"
    block_settings: dict[int, dict] = field(default_factory=dict)
    selection: dict | None = None
    base_model_type: str | None = None
    base_model: str | None = None
    blocks_path: str | None = None
    mlp_attribute: str | None = None
    bypassed_attributes: list[str] | None = None
    hidden_size: int | None = None
    mlp_layout: dict[str, str] | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if isinstance(self.blocks, dict):
            if self.block_settings:
                raise ValueError("kan_config: give per-block settings either in blocks={index: settings} or in "
                                 "block_settings, not both")
            self.block_settings = {index: dict(settings or {}) for index, settings in self.blocks.items()}
            self.blocks = list(self.blocks)
        elif isinstance(self.blocks, tuple):
            self.blocks = list(self.blocks)
        self.block_settings = {_block_key(key): value for key, value in self.block_settings.items()}
        self._check_fields()

    # ------------------------------------------------------------------ reading

    def settings(self, index: int) -> dict:
        """The KAN feedforward settings of block ``index``: the config's, with the block's own on top."""
        own = self.block_settings.get(index, {})
        merged = {name: own.get(name, getattr(self, name)) for name in BLOCK_SETTINGS}
        merged["basis_options"] = dict(merged["basis_options"])
        return merged

    def feedforward_arguments(self, index: int) -> dict:
        """``KANFeedForward`` keyword arguments (without device and dtype) of block ``index``."""
        settings = self.settings(index)
        return {
            "hidden_size": self.hidden_size, "intermediate_size": settings["intermediate_size"],
            "basis": settings["basis"], "degree": settings["degree"], "input_map": settings["input_map"],
            "bias": settings["bias"], "base": settings["base"], **settings["basis_options"],
            **({"gated": True} if self.form == "gated" else {}),
        }

    def function_arguments(self, index: int) -> dict:
        """``form="glu"``: ``ChannelFunctions`` keyword arguments (without device and dtype) of block ``index``."""
        settings = self.settings(index)
        return {"channels": settings["intermediate_size"], "basis": settings["basis"], "degree": settings["degree"],
                "groups": self.function_groups, **settings["basis_options"]}

    @property
    def is_complete(self) -> bool:
        """Whether ``retrofit`` completed this config (it then describes one model exactly)."""
        return self.base_model_type is not None

    # ------------------------------------------------------------------ (de)serialising

    def to_dict(self) -> dict:
        """The JSON object ``config.json`` stores as ``kan_config`` (block indices as strings in ``block_settings``)."""
        data = dataclasses.asdict(self)
        data["block_settings"] = {str(index): settings for index, settings in sorted(self.block_settings.items())}
        return data

    @classmethod
    def from_dict(cls, data, base_model_type: str | None = None) -> RetrofitConfig:
        """The config a ``kan_config`` dict describes, checked field by field; dicts of older schema versions (1:
        kallm before ``RetrofitConfig``; 2: before ``form``; 3: before ``base``) are upgraded. A saved config must
        be complete (see ``check_complete``).
        ``base_model_type``, when given, is the family the config must belong to."""
        if not isinstance(data, dict):
            raise ValueError(f"kan_config must be a dict (a JSON object) or null, got {data!r}")
        version = data.get("schema_version")
        if not is_int(version) or version < 1:
            raise ValueError(
                f"kan_config has no integer schema_version >= 1 (got {version!r}); it was not written by kallm"
            )
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"this checkpoint's kan_config schema_version is {version}, but the installed kallm code only "
                f"understands versions up to {SCHEMA_VERSION}; upgrade kallm (pip install -U kallm) to load it"
            )
        if version == 1:
            data = _upgrade_version_1(data)
        if data["schema_version"] == 2:
            data = _upgrade_version_2(data)
        if data["schema_version"] == 3:
            data = _upgrade_version_3(data)
        expected = [f.name for f in dataclasses.fields(cls)]
        missing = [key for key in expected if key not in data]
        if missing:
            raise ValueError(f"kan_config is missing {missing}; expected keys: {', '.join(expected)}")
        unknown = sorted(str(key) for key in data if key not in expected)
        if unknown:
            raise ValueError(
                f"kan_config has unknown keys {unknown} for schema_version {version}; expected keys: "
                f"{', '.join(expected)}"
            )
        settings = data["block_settings"]
        if not isinstance(settings, dict):
            raise ValueError(f"kan_config.block_settings must be a dict of block index -> settings, got {settings!r}")
        try:
            config = cls(**{**data, "blocks": _copy(data["blocks"]), "block_settings": _copy(settings),
                            "basis_options": _copy(data["basis_options"]),
                            "bypassed_attributes": _copy(data["bypassed_attributes"]),
                            "mlp_layout": _copy(data["mlp_layout"])})
        except TypeError as error:  # a value of the wrong type is a broken file here, not a wrong call
            raise ValueError(str(error)) from error
        config.check_complete(base_model_type)
        return config

    # ------------------------------------------------------------------ checks

    def check_complete(self, base_model_type: str | None = None) -> None:
        """Refuse a config that does not describe one retrofitted model exactly (what ``retrofit`` writes)."""
        for key in ("base_model_type", "base_model", "blocks_path", "mlp_attribute"):
            _check_text(key, getattr(self, key))
        if base_model_type is not None and self.base_model_type != base_model_type:
            raise ValueError(
                f"kan_config.base_model_type is {self.base_model_type!r}, but this config class retrofits "
                f"{base_model_type!r} models"
            )
        blocks = self.blocks
        _check_block_list("blocks", blocks)
        unlisted = sorted(set(self.block_settings) - set(blocks))
        if unlisted:
            raise ValueError(f"kan_config.block_settings has settings for blocks {unlisted}, which blocks "
                             f"{blocks} does not list")
        bypassed = self.bypassed_attributes
        if not isinstance(bypassed, list) or len(set(map(repr, bypassed))) != len(bypassed):
            raise ValueError(
                f"kan_config.bypassed_attributes must be a list of distinct attribute names, got {bypassed!r}"
            )
        for name in bypassed:
            _check_text("bypassed_attributes", name)
        check_size("kan_config.hidden_size", self.hidden_size)
        if self.form == "glu" and not isinstance(self.mlp_layout, dict):
            raise ValueError(f"kan_config.mlp_layout must be a dict of MLP parts by role for form='glu', got "
                             f"{self.mlp_layout!r}")
        if self.kind == "kan":
            for index in blocks:
                check_size("kan_config.intermediate_size", self.settings(index)["intermediate_size"])
                self._check_builds(index)

    def _check_fields(self):
        """Every field by type and value, as far as they can be checked without the model."""
        if self.last_n is not None and not is_int(self.last_n):
            raise ValueError(f"last_n must be an integer between 1 and the model's block count, got {self.last_n!r}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; valid choices: {', '.join(KINDS)}")
        if self.init is not None and self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; valid choices: {', '.join(INITS)}")
        self._check_form()
        if self.blocks == AUTO:
            if not is_int(self.num_blocks) or self.num_blocks < 1:
                raise ValueError(f"blocks='auto' needs num_blocks, how many blocks to retrofit (a positive "
                                 f"integer), got {self.num_blocks!r}")
            if self.block_settings:
                raise ValueError("blocks='auto' chooses the blocks itself, so it takes no per-block settings")
        elif self.num_blocks is not None:
            raise ValueError(f"num_blocks={self.num_blocks!r} is only used with blocks='auto'")
        elif self.blocks is not None:
            if isinstance(self.blocks, (str, bytes)) or not isinstance(self.blocks, list):
                raise TypeError(f"blocks must be a list of block indices, a dict of block index -> settings, or "
                                f"'auto', got {self.blocks!r}")
            for index in self.blocks:
                if not is_int(index):
                    raise TypeError(f"block indices must be integers, got {index!r}")
        for key in ("base_model_type", "base_model", "blocks_path", "mlp_attribute"):
            if getattr(self, key) is not None:
                _check_text(key, getattr(self, key))
        if self.hidden_size is not None:
            check_size("kan_config.hidden_size", self.hidden_size)
        if self.selection is not None and not isinstance(self.selection, dict):
            raise ValueError(f"kan_config.selection must be a dict (a JSON object) or null, got {self.selection!r}")
        self._check_settings("kan_config", {name: getattr(self, name) for name in BLOCK_SETTINGS})
        for index, own in self.block_settings.items():
            owner = f"kan_config.block_settings[{index}]"
            if not isinstance(own, dict):
                raise ValueError(f"{owner} must be a dict of settings, got {own!r}")
            unknown = sorted(set(own) - set(BLOCK_SETTINGS))
            if unknown:
                raise ValueError(
                    f"{owner} has unknown settings {unknown}; a block may set: {', '.join(BLOCK_SETTINGS)}"
                )
            self._check_settings(owner, own)
        for index in [None, *self.block_settings]:
            self._check_builds(index)
        if self.kind == "linear":
            self._check_linear()

    @staticmethod
    def _check_settings(owner: str, settings: dict):
        if "basis" in settings:
            _check_text("basis", settings["basis"], owner)
        if "degree" in settings and not is_int(settings["degree"]):
            raise ValueError(f"{owner}.degree must be a positive integer, got {settings['degree']!r}")
        if settings.get("intermediate_size") is not None:
            check_size(f"{owner}.intermediate_size", settings["intermediate_size"])
        if "input_map" in settings and settings["input_map"] not in INPUT_MAPS:
            raise ValueError(f"unknown input_map {settings['input_map']!r}; valid choices: {', '.join(INPUT_MAPS)}")
        if "bias" in settings and not isinstance(settings["bias"], bool):
            raise ValueError(f"{owner}.bias must be true or false, got {settings['bias']!r}")
        if "base" in settings:
            check_base(settings["base"], f"{owner}.base")
        if "basis_options" in settings:
            options = settings["basis_options"]
            if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
                raise ValueError(f"{owner}.basis_options must be a dict of basis options (a JSON object), got "
                                 f"{options!r}")
            placement = sorted(set(PLACEMENT_OPTIONS) & set(options))
            if placement:
                raise ValueError(f"{owner}.basis_options may not hold {placement}: KAN feedforwards get the device "
                                 f"and dtype of the MLP they replace")
            misplaced = sorted(set(_LAYER_FIELDS) & set(options))
            if misplaced:
                raise ValueError(f"{owner}.basis_options may not hold {misplaced}: they are settings of their own")
            # kan_config travels in config.json, so options must survive a JSON round trip unchanged.
            try:
                same = json.loads(json.dumps(options)) == options
            except (TypeError, ValueError):
                same = False
            if not same:
                raise TypeError(
                    f"layer options must be plain JSON values (str, int, float, bool, lists), got {options!r}"
                )

    def _check_form(self):
        if self.form not in FORMS:
            raise ValueError(f"unknown form {self.form!r}; valid choices: {', '.join(FORMS)}")
        if self.function_groups is not None:
            if self.form != "glu":
                raise ValueError(f"function_groups={self.function_groups!r} is a setting of form='glu'")
            check_size("kan_config.function_groups", self.function_groups)
        if self.mlp_layout:  # empty for a layout whose mlp_attribute is the activation itself
            check_layout(self.mlp_layout)
        if self.form == "gated":
            if self.kind != "kan":
                raise ValueError(f"form='gated' is a retrofit of kind='kan'; kind={self.kind!r} restarts the MLPs "
                                 f"instead")
            blocks = [{}, *self.block_settings.values()]  # the config's own settings, then each block's
            bases = {own.get("base", self.base) for own in blocks}
            if self.init == "fit" and bases != {"linear"}:
                raise ValueError("init='fit' starts form='gated' as the MLP's most important channels, which its "
                                 "layers hold exactly only with base='linear'; pass base='linear', or "
                                 "init='random'")
            stages = max(len(str(own.get("basis", self.basis)).split(">")) for own in blocks)
            if self.init == "fit" and stages > 2:
                raise ValueError("fit init of form='gated' needs a two-stage basis (one '>' at most): it copies the "
                                 "MLP's gate, up and down projections into three KAN layers")
        if self.form != "glu":
            return
        if self.kind != "kan":
            raise ValueError(f"form='glu' is a retrofit of kind='kan'; kind={self.kind!r} restarts the MLPs instead")
        if self.init == "fit":
            raise ValueError("form='glu' starts exactly at the original MLP, so there is nothing to fit: use "
                             "init='random' (its functions start at zero)")
        defaults = RetrofitConfig.__dataclass_fields__
        given = [name for name in ("input_map", "bias", "base") if getattr(self, name) != defaults[name].default]
        given += sorted({name for own in self.block_settings.values() for name in own if name in KAN_FORM_SETTINGS})
        if given:
            raise ValueError(f"form='glu' keeps the MLP's own projections, so the KAN feedforward settings "
                             f"{sorted(set(given))} do not apply; set basis, degree, basis options and "
                             f"function_groups")

    def _check_linear(self):
        """The linear restart keeps each MLP's shape: KAN settings other than the defaults mean a mistake."""
        defaults = RetrofitConfig.__dataclass_fields__
        given = [name for name in BLOCK_SETTINGS
                 if getattr(self, name) != (defaults[name].default_factory() if name == "basis_options"
                                            else defaults[name].default)]
        if given or self.block_settings:
            raise ValueError(
                f"kind='linear' restarts the MLPs in their own shape, so KAN settings do not apply; got "
                f"{', '.join(f'{name}={getattr(self, name)!r}' for name in given) or 'per-block settings'}"
            )
        if self.init == "fit":
            raise ValueError("init='fit' fits KAN feedforwards; use it with kind='kan'")

    def _check_builds(self, index: int | None):
        """Build the basis of ``index`` (None: the config-wide settings) with all its options; allocates nothing."""
        settings = self.settings(index) if index is not None else {n: getattr(self, n) for n in BLOCK_SETTINGS}
        try:
            if self.form == "glu":
                ChannelFunctions.count_parameters(
                    settings["intermediate_size"] or self.function_groups or 1, settings["basis"], settings["degree"],
                    self.function_groups, **settings["basis_options"],
                )
                return
            KANFeedForward.count_parameters(
                self.hidden_size or 1, settings["intermediate_size"] or 1, settings["basis"], settings["degree"],
                input_map=settings["input_map"], bias=settings["bias"], base=settings["base"],
                gated=self.form == "gated", **settings["basis_options"],
            )
        except (TypeError, ValueError) as error:
            hint = ""
            if "unknown basis" in str(error):
                hint = "; a basis added with kallm.register_basis must be registered before the checkpoint is loaded"
            where = "" if index is None else f" of block {index}"
            built = {"glu": "the functions of form='glu'", "gated": "a gated KAN feedforward"}.get(
                self.form, "a KAN feedforward")
            raise ValueError(f"kan_config's basis, degree and options{where} do not build {built}: "
                             f"{error}{hint}") from error


def read_retrofit_config(config) -> RetrofitConfig | None:
    """The ``RetrofitConfig`` a model's (transformers) config records, or None if kallm never changed it.

    Reads ``config.kan_config`` of any schema version, and the ``kallm_restarted_layers`` attribute with which
    kallm before schema version 2 marked a linear restart.
    """
    kan_config = getattr(config, "kan_config", None)
    if kan_config:
        return RetrofitConfig.from_dict(kan_config)
    restarted = getattr(config, "kallm_restarted_layers", None)
    if restarted:
        return RetrofitConfig(blocks=sorted(restarted), last_n=None, kind="linear", init=None,
                              base_model_type=config.model_type, base_model=config.model_type)
    return None


def kan_config_blocks(config) -> list[int]:
    """Indices of the blocks holding KAN feedforwards according to a model's config (empty if none)."""
    retrofit_config = read_retrofit_config(config)
    return list(retrofit_config.blocks) if retrofit_config and retrofit_config.kind == "kan" else []


def _upgrade_version_1(data: dict) -> dict:
    """A schema version 1 ``kan_config`` in version 2's keys: ``layers`` became ``blocks``, ``layer_options`` became
    ``input_map``, ``bias`` and ``basis_options``; kind, init and block settings were not recorded."""
    version_1_keys = ("schema_version", "base_model_type", "base_model", "layers", "blocks_path", "mlp_attribute",
                      "bypassed_attributes", "hidden_size", "intermediate_size", "basis", "degree", "layer_options")
    missing = [key for key in version_1_keys if key not in data]
    unknown = sorted(str(key) for key in data if key not in version_1_keys)
    if missing:
        raise ValueError(f"kan_config is missing {missing}; expected keys: {', '.join(version_1_keys)}")
    if unknown:
        raise ValueError(f"kan_config has unknown keys {unknown} for schema_version 1; expected keys: "
                         f"{', '.join(version_1_keys)}")
    _check_block_list("layers", data["layers"])
    options = data["layer_options"]
    if not isinstance(options, dict):
        raise ValueError(
            f"kan_config.layer_options must be a dict of KANLinear options (a JSON object), got {options!r}"
        )
    upgraded = {key: value for key, value in data.items() if key not in ("layers", "layer_options")}
    upgraded.update(
        schema_version=2, blocks=data["layers"], last_n=None, num_blocks=None, kind="kan", init=None,
        block_settings={}, selection=None, input_map=options.get("input_map", "affine"), bias=options.get("bias", True),
        basis_options={k: v for k, v in options.items() if k not in _LAYER_FIELDS},
    )
    return upgraded


def _check_block_list(key, blocks):
    valid = isinstance(blocks, list) and blocks and all(is_int(i) and i >= 0 for i in blocks)
    if not valid or blocks != sorted(set(blocks)):
        raise ValueError(
            f"kan_config.{key} must be a non-empty, sorted list of distinct non-negative block indices, got {blocks!r}"
        )


def _upgrade_version_2(data: dict) -> dict:
    """A schema version 2 ``kan_config`` in version 3's keys: every version 2 retrofit was of ``form="kan"``."""
    return _add_keys(data, {"form": "kan", "function_groups": None, "mlp_layout": None})


def _upgrade_version_3(data: dict) -> dict:
    """A schema version 3 ``kan_config`` in today's keys: no version 3 retrofit had a base branch."""
    return _add_keys(data, {"base": None})


def _add_keys(data: dict, added: dict) -> dict:
    """``data`` one schema version up, with the keys that version ``added``."""
    version = data["schema_version"]
    present = sorted(key for key in added if key in data)
    if present:
        raise ValueError(f"kan_config has unknown keys {present} for schema_version {version}; they came with "
                         f"version {version + 1}")
    return {**data, **added, "schema_version": version + 1}


def _block_key(key) -> int:
    """A ``block_settings`` key as an int (JSON objects have string keys)."""
    if isinstance(key, str) and key.lstrip("-").isdigit():
        return int(key)
    if is_int(key):
        return key
    raise ValueError(f"kan_config.block_settings keys must be block indices, got {key!r}")


def _copy(value):
    return json.loads(json.dumps(value)) if isinstance(value, (dict, list)) else value


def _check_text(key, value, owner="kan_config"):
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{owner}.{key} must be a non-empty string, got {value!r}")


def retrofitted_blocks(model) -> list[int]:
    """Indices of the decoder blocks kallm changed (KAN or linear restart); empty if none."""
    retrofit_config = read_retrofit_config(model.config)
    return list(retrofit_config.blocks) if retrofit_config else []
