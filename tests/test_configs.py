"""Experiment configs: every experiment builds, overrides are checked, the entry point rejects typos."""
import glob
import os

import ml_collections
import pytest

from pixeldance import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))
RUNLOCAL = os.path.join(REPO, "experiments", "shapes.py") + ":runlocal"


def test_experiments_found():
    names = [os.path.basename(p) for p in EXPERIMENTS]
    assert "base.py" in names and "shapes.py" in names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_experiment_builds(path):
    full = configs.load_config(path)
    small = configs.load_config(path + ":runlocal")
    for c in (full, small):
        assert isinstance(c, ml_collections.ConfigDict)
        assert c.is_locked
        assert c.mode in ("train", "train_vae", "cache", "train_dit", "sample")
        assert len(c.mesh.shape) == 4
    # runlocal shrinks the run; it never grows it.
    assert small.vae.num_steps <= full.vae.num_steps and small.train.num_steps <= full.train.num_steps
    assert small.data.resolution <= full.data.resolution
    # Each experiment's docstring holds the command that runs it.
    with open(path) as f:
        source = f.read()
    assert f"--config=experiments/{os.path.basename(path)}" in source


def test_load_config_errors():
    with pytest.raises(FileNotFoundError, match="nope.py"):
        configs.load_config("experiments/nope.py:runlocal")
    with pytest.raises(ValueError, match="runlocl"):
        configs.load_config(RUNLOCAL.replace("runlocal", "runlocl"))


def test_override():
    base = configs.load_config(RUNLOCAL)
    c = configs.override(base, **{"train.num_steps": 3, "mesh.preset": "data", "seed": 7})
    assert (c.train.num_steps, c.mesh.preset, c.seed) == (3, "data", 7)
    assert (base.train.num_steps, base.mesh.preset, base.seed) == (4, "fsdp", 0)  # a copy
    assert c.is_locked


@pytest.mark.parametrize("key", ["train.num_stepz", "trian.num_steps", "num_steps"])
def test_override_misspelt_key(key):
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        configs.override(configs.load_config(RUNLOCAL), **{key: 3})


def test_override_wrong_type():
    with pytest.raises(TypeError):
        configs.override(configs.load_config(RUNLOCAL), **{"train.num_steps": "many"})


def test_locked_config_rejects_new_fields():
    c = configs.load_config(RUNLOCAL)
    with pytest.raises(AttributeError):
        c.train.num_stepz = 3
    with pytest.raises(AttributeError):
        c.new_section = dict(a=1)
    c.train.num_steps = 3  # existing fields stay writable
    assert c.train.num_steps == 3


def test_parse_arg_types():
    defaults = dict(runlocal=False, variant="B/2", steps=10, lr=0.1)
    a = configs.parse_arg(None, **defaults)
    assert a.to_dict() == defaults
    assert configs.parse_arg("", **defaults).to_dict() == defaults
    a = configs.parse_arg("runlocal,variant=mu,steps=3,lr=2e-3", **defaults)
    assert a.runlocal is True and a.variant == "mu"
    assert a.steps == 3 and isinstance(a.steps, int)
    assert a.lr == 2e-3 and isinstance(a.lr, float)
    assert configs.parse_arg("runlocal=false", **defaults).runlocal is False
    assert configs.parse_arg("runlocal=1", **defaults).runlocal is True
    assert configs.parse_arg(" steps=4 , ", **defaults).steps == 4


@pytest.mark.parametrize("arg, match", [
    ("runlocl", "runlocl"),              # unknown names are named
    ("varaint=S", "varaint"),
    ("steps", "steps"),                  # a bare name is only for booleans
    ("runlocal=maybe", "runlocal"),      # booleans are true/false
    ("steps=ten", "ten"),                # ints must parse
])
def test_parse_arg_errors(arg, match):
    with pytest.raises(ValueError, match=match):
        configs.parse_arg(arg, runlocal=False, variant="B/2", steps=10)


def test_entry_point_rejects_misspelt_flag(python_runner, tmp_path):
    workdir = tmp_path / "wd"
    proc = python_runner("-m", "pixeldance.main", f"--config={RUNLOCAL}", f"--workdir={workdir}",
                         "--config.train.num_stepz=1")
    assert proc.returncode != 0
    assert "num_stepz" in proc.stderr
    assert not workdir.exists()  # rejected before anything ran


def test_entry_point_rejects_unknown_config_argument(python_runner, tmp_path):
    workdir = tmp_path / "wd"
    proc = python_runner("-m", "pixeldance.main", f"--config={RUNLOCAL.replace('runlocal', 'runlocl')}",
                         f"--workdir={workdir}")
    assert proc.returncode != 0
    assert "runlocl" in proc.stderr
    assert not workdir.exists()


def test_importing_entry_points_defines_no_flags(python_runner):
    """Importing pixeldance.main (as tests and notebooks do, for run_stage / sample_stage) leaves the
    flag names free for pixeldance.sample's and tools.metrics' command lines in the same process."""
    proc = python_runner("-c", "import pixeldance.main; from absl import flags; "
                         "assert 'workdir' not in flags.FLAGS and 'config' not in flags.FLAGS; "
                         "from pixeldance import sample; sample.define_flags(); print('free')")
    assert proc.returncode == 0, proc.stderr
    assert "free" in proc.stdout


def test_shapes_keyframes_sharp_changes_only_the_vae_crops():
    """Issue 20's sharp-VAE experiment is shapes_keyframes with the VAE on 32 px crops, 8 per batch,
    9,000 steps (the main job's stage, longer) and the 4-layer DiT its results were measured with
    (the main job's has 3 since session 28): everything else (data, DiT width, keyframe sets,
    sampling) is the same; runlocal is shapes_keyframes' runlocal."""
    base = configs.load_config(os.path.join(REPO, "experiments", "shapes_keyframes.py")).to_dict()
    sharp = configs.load_config(os.path.join(REPO, "experiments", "shapes_keyframes_sharp.py")).to_dict()
    vae_base, vae_sharp = base.pop("vae"), sharp.pop("vae")
    assert (base["dit"].pop("depth"), sharp["dit"].pop("depth")) == (3, 4)
    assert sharp == base
    assert (vae_sharp["train_size"], vae_sharp["batch_size"], vae_sharp["num_steps"]) == (32, 8, 9_000)
    assert vae_sharp["train_size"] < base["data"]["resolution"]
    changed = {k for k in vae_base if vae_base[k] != vae_sharp[k]}
    assert changed == {"num_steps"}, changed  # the main job's VAE stage is on the same crops
    assert vae_base["num_steps"] < vae_sharp["num_steps"]
    small = [configs.load_config(os.path.join(REPO, "experiments", f"{n}.py:runlocal")).to_dict()
             for n in ("shapes_keyframes", "shapes_keyframes_sharp")]
    assert small[0] == small[1]


def test_vae_crops_on_the_synthetic_world_only():
    """The main job's VAE stage trains on 32 px crops of its 64 px clips (issue 19, session 25);
    the real-data experiments keep the whole-frame stage they were written with, and every
    runlocal trains on whole frames."""
    load = lambda name: configs.load_config(os.path.join(REPO, "experiments", name))
    main = load("shapes.py")
    assert (main.vae.train_size, main.vae.batch_size, main.vae.num_steps) == (32, 8, 2000)
    assert main.vae.train_size < main.data.resolution
    for name in ("ucf101", "msrvtt", "video_folder", "video_image_mix"):
        c = load(f"{name}.py")
        assert (c.vae.train_size, c.vae.batch_size, c.vae.num_steps) == (0, 4, 1500), name
    for name in ("shapes", "ucf101", "video_folder"):
        assert load(f"{name}.py:runlocal").vae.train_size == 0, name


def test_small_dits_run_their_layers_unrolled():
    """The built-in world's DiTs unroll their layer loop (issue 19: 1.2x the main job's train
    step on a 2-core CPU); larger variants keep one compiled layer; build.dit passes it on."""
    from pixeldance import build
    load = lambda arg: configs.load_config(os.path.join(REPO, "experiments", "shapes.py") + arg)
    assert load("").dit.scan_unroll == load(":dit=shapes_wide").dit.scan_unroll == 4
    assert load(":dit=B").dit.scan_unroll == 1
    for unroll in (1, 3):
        config = configs.override(load(":runlocal"), **{"dit.scan_unroll": unroll})
        assert build.dit(config, 16).dit.scan_unroll == unroll


def test_dit_attention_impl_reaches_every_attention():
    """config.dit.attention_impl: '' leaves the kernel to the backend (None), a name forces it
    on the DiT's blocks (build.dit)."""
    from pixeldance import build
    config = configs.load_config(os.path.join(REPO, "experiments", "shapes.py") + ":runlocal")
    assert config.dit.attention_impl == "" and build.dit(config, 16).dit.attention_impl is None
    for impl in ("xla", "dense"):
        assert build.dit(configs.override(config, **{"dit.attention_impl": impl}), 16).dit.attention_impl == impl


def test_dit_depth_overrides_the_variant():
    """config.dit.depth > 0 replaces the size table's depth (build.dit, and the planner's FLOPs
    through build.dit_size); 0 keeps the table's; anything else is refused naming it."""
    from pixeldance import build
    from pixeldance.models import dit as dit_lib
    config = configs.load_config(os.path.join(REPO, "experiments", "shapes.py") + ":runlocal")
    table = dit_lib.DIT_VARIANTS[config.dit.variant]["depth"]
    assert build.dit(configs.override(config, **{"dit.depth": 0}), 16).dit.depth == table
    deeper = configs.override(config, **{"dit.depth": table + 1})
    assert build.dit(deeper, 16).dit.depth == table + 1
    assert build.dit_size(deeper) == dict(dit_lib.DIT_VARIANTS[config.dit.variant], depth=table + 1)
    from pixeldance.tools import plan  # the planner's FLOPs follow the depth (no other term is per layer)
    flops = lambda c: plan.model_flops(c, (3, 4, 4, 16), batch=1)
    patch = 2 * 4 * 4 * (33 + 16) * dit_lib.DIT_VARIANTS[config.dit.variant]["width"] * 3  # in/out projections
    assert (flops(deeper) - patch) * table == pytest.approx((flops(config) - patch) * (table + 1))
    with pytest.raises(ValueError, match=r"config.dit.depth must be an integer >= 0"):
        build.check_dit_loop(configs.override(config, **{"dit.depth": -1}))
