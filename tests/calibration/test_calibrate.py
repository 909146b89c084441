"""calibrate() end to end on a tiny Wan (CPU): plan round trip, resume, clear errors, and the plan compiles."""

import json

import pytest
import torch

from qsparse_compiler.calibration import CalibrationError, calibrate, driver, load_samples, save_samples
from qsparse_compiler.formats.pattern_spec import parse_pattern_spec
from qsparse_compiler.plan import load_plan

from ._tiny import tiny_config, wan_and_samples


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's per-test fixture, for this module-wide setup
    tiny, samples = wan_and_samples(num_layers=2, count=4)
    out = tmp_path_factory.mktemp("plan")
    plan = calibrate(tiny.model, samples, tiny_config(), out=out)
    torch.set_num_threads(threads)
    return tiny, samples, out, plan


def test_plan_lists_every_site_and_round_trips(calibrated):
    tiny, _, out, plan = calibrated
    assert len(plan.linears) == tiny.block_linears == 20
    assert set(plan.attentions) == {"blocks.0.attn1", "blocks.1.attn1"}
    for entry in plan.attentions.values():
        assert len(entry.head_patterns) == 2 and entry.block_q == 16
        parse_pattern_spec(entry.pattern_spec, 0.15)  # a spec the layout op accepts
        assert set(entry.cache) in (set(), {"refresh_first", "refresh_every", "order", "rank"})
    for fqn in plan.linears:
        assert plan.packed_weight(fqn) is not None
    info = plan.metadata["calibration"]
    assert info["search"]["total_density"] <= 0.5 and info["search"]["budget_met"]
    assert plan.metadata["cost_model"]["kind"] == "flop_proxy"
    assert set(info["selection"]) >= {"salient", "uniform", "selected"} and len(info["selection"]["selected"]) == 2
    assert all(block["loss_msad"] <= block["loss_rtn"] for block in info["msad"])

    loaded = load_plan(out)
    assert loaded.linears == plan.linears and loaded.attentions == plan.attentions
    assert loaded.fingerprint == plan.fingerprint and loaded.metadata == plan.metadata
    assert sorted(loaded.tensors) == sorted(plan.tensors)
    for name, tensor in plan.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor)


def test_resume_skips_finished_stages(calibrated, monkeypatch):
    tiny, samples, out, plan = calibrated

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("score_samples", "collect_statistics", "search_patterns", "measure_residuals", "distill_block"):
        monkeypatch.setattr(driver, name, must_not_run)
    again = calibrate(tiny.model, samples, tiny_config(), out=out)
    assert set(again.metadata["calibration"]["stages"].values()) == {"resumed"}
    assert again.attentions == plan.attentions
    for name, tensor in plan.tensors.items():
        assert torch.equal(again.tensors[name], tensor)


def test_resume_recomputes_what_a_changed_setting_or_a_missing_block_invalidates(calibrated, tmp_path):
    tiny, samples, out, _ = calibrated
    import shutil

    copy = tmp_path / "plan"
    shutil.copytree(out, copy)
    (copy / "calibration" / "msad" / "blocks.1.json").unlink()  # as if interrupted during block 1
    plan = calibrate(tiny.model, samples, tiny_config(), out=copy)
    stages = plan.metadata["calibration"]["stages"]
    assert stages["msad/blocks.0"] == "resumed" and stages["msad/blocks.1"] == "computed"
    assert stages["search"] == "resumed"
    plan = calibrate(tiny.model, samples, tiny_config(density_budget=0.3), out=copy)
    stages = plan.metadata["calibration"]["stages"]
    assert stages["statistics"] == "resumed"
    assert stages["search"] == stages["ssar"] == stages["msad/blocks.0"] == "computed"
    assert plan.metadata["calibration"]["search"]["total_density"] <= 0.3


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("key", ["hidden_states", "encoder_hidden_states"])
def test_non_finite_input_names_the_sample_and_the_input(key, value):
    tiny, samples = wan_and_samples(count=3)
    samples[1][key].view(-1)[0] = value
    with pytest.raises(CalibrationError, match=rf"sample 1 input '{key}' .*holds NaN/inf"):
        calibrate(tiny.model, samples, tiny_config())


def test_non_finite_weight_names_the_parameter():
    tiny, samples = wan_and_samples(count=3)
    with torch.no_grad():
        tiny.model.blocks[0].ffn.net[2].weight[0, 0] = float("inf")
    with pytest.raises(CalibrationError, match=r"parameter blocks\.0\.ffn\.net\.2\.weight \(64, 128\) holds 1 NaN/inf"):
        calibrate(tiny.model, samples, tiny_config())


def test_nan_activation_names_the_module_and_the_sample():
    tiny, samples = wan_and_samples(count=3)
    original_forward = tiny.model.blocks[0].attn1.to_out[0].forward

    def overflow(x):
        return original_forward(x) * float("inf")  # an fp16-style overflow inside the block

    tiny.model.blocks[0].attn1.to_out[0].forward = overflow
    with pytest.raises(CalibrationError, match=r"blocks\.0\.attn2\.to_q .*sample \d"):
        calibrate(tiny.model, samples, tiny_config(selection="uniform"))


def test_uniform_selection_needs_no_scoring_and_samples_file_round_trip(tmp_path):
    tiny, samples = wan_and_samples(count=3)
    path = save_samples(samples, tmp_path / "samples.safetensors")
    loaded = load_samples(path)
    assert [sorted(s) for s in loaded] == [sorted(s) for s in samples]
    assert loaded[2]["return_dict"] is False and torch.equal(loaded[1]["hidden_states"], samples[1]["hidden_states"])
    plan = calibrate(tiny.model, loaded, tiny_config(selection="uniform", msad_steps=0))
    selection = plan.metadata["calibration"]["selection"]
    assert selection["selected"] == [0, 2] and selection["method"] == "uniform"


@pytest.fixture(scope="module")
def compiled_plan(calibrated):
    """The calibrated plan compiled once through Inductor (both tests below check this one compile): the inputs, the
    compiled output and the rewrite counters of that compile."""
    from torch._dynamo.utils import counters

    tiny, _, out, _ = calibrated
    torch.manual_seed(0)
    inputs = tiny.make_inputs(frames=3)
    with torch.no_grad():
        torch._dynamo.reset()
        counters.clear()
        actual = torch.compile(tiny.model, backend="quantsparse", options={"plan": str(out)})(**inputs)[0]
    return inputs, actual, dict(counters["qsparse"])


@pytest.mark.slow
def test_calibrated_plan_compiles_and_stays_close_to_dense(calibrated, compiled_plan):
    from qsparse_compiler.eval.metrics import relative_error

    tiny = calibrated[0]
    inputs, actual, rewrites = compiled_plan
    with torch.no_grad():
        dense = tiny.model(**inputs)[0]
    assert rewrites["w4a8_linear"] == 20
    assert rewrites["sparse_attention"] == 2
    assert torch.isfinite(actual).all()
    error = relative_error(actual, dense)
    assert 1e-4 < error < 0.05, error


def test_distilled_weights_beat_round_to_nearest_on_held_out_inputs(calibrated):
    import dataclasses

    from qsparse_compiler.calibration.simulate import plan_applied
    from qsparse_compiler.eval.metrics import relative_error

    tiny, _, _, plan = calibrated
    rtn = dataclasses.replace(plan, tensors={})  # same sites and patterns, round-to-nearest weights
    torch.manual_seed(123)
    held_out = [tiny.make_inputs(frames=3) for _ in range(3)]
    errors = {"msad": 0.0, "rtn": 0.0}
    with torch.no_grad():
        for inputs in held_out:
            dense = tiny.model(**inputs)[0]
            for name, candidate in (("msad", plan), ("rtn", rtn)):
                with plan_applied(tiny.model, candidate):
                    errors[name] += relative_error(tiny.model(**inputs)[0], dense)
    assert errors["msad"] < errors["rtn"], errors


@pytest.mark.slow
def test_compiled_plan_computes_what_the_eager_simulation_computes(calibrated, compiled_plan):
    from qsparse_compiler.calibration.simulate import plan_applied
    from qsparse_compiler.eval.metrics import relative_error

    tiny, _, _, plan = calibrated
    inputs, compiled, _ = compiled_plan
    with torch.no_grad(), plan_applied(tiny.model, plan):
        simulated = tiny.model(**inputs)[0]
    # Same ops, same tensors: only Inductor's fusion of the surrounding float math differs.
    assert relative_error(compiled, simulated) < 1e-4


def test_cli_entry_reads_samples_and_config_files_and_prints_a_summary(tmp_path, capsys):
    tiny, samples = wan_and_samples(count=3)
    samples_path = save_samples(samples, tmp_path / "samples.safetensors")
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(tiny_config(msad_steps=2, cost_table={0.25: 0.5, 1.0: 1.5}).to_json()))
    plan = driver.calibrate_cli_main(tiny.model, samples_path, tmp_path / "plan", config_path)
    printed = capsys.readouterr().out
    assert "blocks.0.attn1" in printed and "W4A8 linears" in printed
    assert load_plan(tmp_path / "plan").metadata["cost_model"] == {
        "kind": "measured", "unit": "ms", "table": {"0.25": 0.5, "1.0": 1.5}
    }
    assert plan.attentions["blocks.0.attn1"].block_q == 16


def test_samples_must_be_a_list_of_forward_kwargs():
    tiny, samples = wan_and_samples(count=1)
    with pytest.raises(CalibrationError, match="non-empty list"):
        calibrate(tiny.model, samples[0], tiny_config())
    with pytest.raises(CalibrationError, match="sample 0 has no 'timestep'"):
        calibrate(tiny.model, [{"hidden_states": samples[0]["hidden_states"]}], tiny_config())


def test_timestep_aware_lora_lands_in_the_plan_and_the_simulation_applies_it(tmp_path):
    from qsparse_compiler.calibration.simulate import plan_applied

    tiny, samples = wan_and_samples(count=3)
    plan = calibrate(tiny.model, samples, tiny_config(num_samples=0, lora_rank=2, lora_steps=20, lora_lr=1e-2),
                     out=tmp_path)
    loaded = load_plan(tmp_path)
    assert loaded.metadata["lora"]["rank"] == 2 and loaded.metadata["lora"]["bucket_edges"] == [250.0, 500.0, 750.0]
    lora_names = [name for name in loaded.tensors if name.endswith(".lora_a")]
    assert len(lora_names) == len(plan.linears) == 10
    inputs = samples[0]
    with torch.no_grad():
        with plan_applied(tiny.model, loaded):
            with_lora = tiny.model(**inputs)[0]
        with plan_applied(tiny.model, loaded, lora=False):
            without = tiny.model(**inputs)[0]
    assert not torch.equal(with_lora, without)


@pytest.mark.slow
def test_the_backend_applies_the_calibrated_lora(tmp_path):
    """Calibrate with lora_rank > 0, compile with the plan's weights and dense attention (the LoRA corrects the
    quantization error; the residual cache corrects the sparsity's): on the samples the LoRA was trained on
    (timesteps 100, 500, 900: three buckets, one compiled graph), the compiled model is closer to the dense model
    than with the same plan without its LoRA tensors, and computes what the eager simulation of the plan computes."""
    from torch._dynamo.utils import counters

    from qsparse_compiler.calibration.simulate import plan_applied
    from qsparse_compiler.plan import Plan, save_plan
    from qsparse_compiler.eval.metrics import relative_error

    tiny, samples = wan_and_samples(count=3)
    calibrate(tiny.model, samples, tiny_config(num_samples=0, lora_rank=2, lora_steps=20, lora_lr=1e-2),
              out=tmp_path / "lora")
    plan = load_plan(tmp_path / "lora")
    assert plan.lora_edges == (250.0, 500.0, 750.0)
    tensors = {name: t for name, t in plan.tensors.items() if not name.endswith((".lora_a", ".lora_b"))}
    metadata = {key: value for key, value in plan.metadata.items() if key != "lora"}
    save_plan(Plan(plan.fingerprint, plan.linears, plan.attentions, tensors, metadata), tmp_path / "plain")
    with torch.no_grad():
        dense = [tiny.model(**sample)[0] for sample in samples]
        with plan_applied(tiny.model, plan, sparsify=False):
            simulated = [tiny.model(**sample)[0] for sample in samples]
        errors = {}
        for name in ("lora", "plain"):
            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(tiny.model, backend="quantsparse",
                                     options={"plan": str(tmp_path / name), "sparsity": {"enabled": False}},
                                     fullgraph=True)
            outputs = [compiled(**sample)[0] for sample in samples]
            errors[name] = sum(relative_error(out, ref) for out, ref in zip(outputs, dense))
            if name == "lora":
                assert max(relative_error(out, sim) for out, sim in zip(outputs, simulated)) < 1e-4
                assert counters["stats"]["unique_graphs"] == 1
    assert errors["lora"] < 0.95 * errors["plain"], errors  # measured: 0.0255 vs 0.0281 (dense attention)


def test_samples_of_several_video_sizes_calibrate_together():
    tiny, samples = wan_and_samples(count=2)
    longer = tiny.make_inputs(frames=5)
    longer["timestep"] = torch.tensor([300])
    plan = calibrate(tiny.model, [*samples, longer], tiny_config(num_samples=0, msad_steps=5))
    candidates = plan.metadata["calibration"]["search"]["candidates"]
    (grids,) = candidates
    assert "frames=3" in grids and "frames=5" in grids
    assert plan.metadata["calibration"]["search"]["budget_met"]


def test_a_model_whose_attention_is_not_seen_warns_and_stays_dense(monkeypatch):
    from qsparse_compiler.calibration import hooks

    tiny, samples = wan_and_samples(count=2)
    # As with a non-native attention backend: no SDPA call reaches the interceptor as a video attention.
    monkeypatch.setattr(hooks.AttentionInterceptor, "_video_call", lambda self, *args: None)
    with pytest.warns(UserWarning, match="no video self-attention was seen"):
        plan = calibrate(tiny.model, samples, tiny_config(num_samples=0, msad_steps=0))
    assert plan.attentions == {} and len(plan.linears) == 10


@pytest.mark.slow
def test_conditioning_linears_calibrated_as_int4_weight_only_compile_from_the_plan(tmp_path):
    """With conditioning_linears="int4_weight_only", the plan lists HunyuanVideo's modulation linears as WEIGHT_ONLY
    with their distilled tensors and no LoRA (TALoRA is for the W4A8 linears); the backend compiles them from the plan
    whatever its own conditioning_linears says, and computes what the eager simulation of the plan computes."""
    from torch._dynamo.utils import counters

    from qsparse_compiler.compiler.backend import clear_reports, reports
    from qsparse_compiler.calibration.simulate import plan_applied
    from qsparse_compiler.config import WEIGHT_ONLY
    from qsparse_compiler.eval.metrics import relative_error
    from qsparse_compiler.eval.models import tiny_hunyuan

    tiny = tiny_hunyuan()
    samples = [{**tiny.make_inputs(), "timestep": torch.tensor([t])} for t in (100, 500, 900)]
    config = tiny_config(num_samples=0, conditioning_linears="int4_weight_only", lora_rank=2, lora_steps=5)
    calibrate(tiny.model, samples, config, out=tmp_path)
    plan = load_plan(tmp_path)
    weight_only = sorted(fqn for fqn, entry in plan.linears.items() if entry.act_format == WEIGHT_ONLY)
    assert len(weight_only) == tiny.conditioning_linears == 3
    assert all(".norm" in fqn and f"{fqn}.qweight" in plan.tensors for fqn in weight_only)
    assert not any(f"{fqn}.lora_a" in plan.tensors for fqn in weight_only)
    assert len(plan.linears) - len(weight_only) == tiny.block_linears
    with torch.no_grad():
        with plan_applied(tiny.model, plan):
            simulated = tiny.model(**samples[1])[0]
        torch._dynamo.reset()
        clear_reports()
        counters.clear()
        compiled = torch.compile(tiny.model, backend="quantsparse", options={"plan": str(tmp_path)}, fullgraph=True)
        actual = compiled(**samples[1])[0]
    assert counters["qsparse"]["int4_weight_only"] == 3 and counters["qsparse"]["w4a8_linear"] == tiny.block_linears
    sites = {site.fqn: site for site in reports()[0].sites}
    assert all(sites[fqn].action == "int4_weight_only" and sites[fqn].details["weights"] == str(tmp_path)
               for fqn in weight_only), [sites[fqn] for fqn in weight_only]
    assert relative_error(actual, simulated) < 1e-4


class _Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing in calibration can catch it."""


def _stage_names(out) -> list[str]:
    return sorted(str(p.relative_to(out / driver.CHECKPOINT_DIR).with_suffix(""))
                  for p in (out / driver.CHECKPOINT_DIR).rglob("*.json"))


@pytest.mark.parametrize("when", ["after_write", "mid_write"])
def test_a_kill_at_any_stage_resumes_to_the_uninterrupted_plan(calibrated, tmp_path, monkeypatch, when):
    """Kill calibration at each stage - right after its checkpoint is written, or while it is being written (between
    the temporary file and its rename) - then resume: the plan equals the uninterrupted run's, and no checkpoint
    file is ever half-written."""
    from qsparse_compiler.calibration import checkpoint

    tiny, samples, reference_out, plan = calibrated
    stages = _stage_names(reference_out)
    assert {"selection", "statistics", "search", "ssar", "msad/blocks.0", "msad/blocks.1"} <= set(stages)
    original_save, original_replace = checkpoint.StageStore.save, checkpoint.Path.replace
    for target in stages:
        out = tmp_path / f"{when}-{target.replace('/', '_')}"

        def save(self, name, key, data, tensors=None, _target=target):
            if when == "mid_write" and name == _target:
                def torn(path, destination):  # the temporary file is complete; the kill lands before its rename
                    raise _Killed
                monkeypatch.setattr(checkpoint.Path, "replace", torn)
            original_save(self, name, key, data, tensors)
            if name == _target:
                raise _Killed

        monkeypatch.setattr(checkpoint.StageStore, "save", save)
        with pytest.raises(_Killed):
            calibrate(tiny.model, samples, tiny_config(), out=out)
        monkeypatch.setattr(checkpoint.StageStore, "save", original_save)
        monkeypatch.setattr(checkpoint.Path, "replace", original_replace)
        for path in (out / driver.CHECKPOINT_DIR).rglob("*.json"):
            json.loads(path.read_text())  # every checkpoint in place parses
        resumed = calibrate(tiny.model, samples, tiny_config(), out=out)
        status = resumed.metadata["calibration"]["stages"]
        assert status[target] == ("resumed" if when == "after_write" else "computed"), target
        assert resumed.attentions == plan.attentions and resumed.linears == plan.linears, target
        assert resumed.tensors.keys() == plan.tensors.keys()
        for name, tensor in plan.tensors.items():
            assert torch.equal(resumed.tensors[name], tensor), (target, name)
        assert when == "mid_write" or not list((out / driver.CHECKPOINT_DIR).rglob("*.tmp"))


@pytest.mark.parametrize("selection", ["salient", "uniform"])
def test_too_few_samples_for_the_selection_names_num_samples(selection):
    tiny, samples = wan_and_samples(count=3)
    with pytest.raises(CalibrationError, match=r"num_samples=5 but only 3 candidate .*lower num_samples to at most 3"):
        calibrate(tiny.model, samples, tiny_config(num_samples=5, selection=selection))


def test_a_budget_no_pattern_meets_names_density_budget_and_the_reachable_density():
    tiny, samples = wan_and_samples(count=2)
    # only a dense-ish window may be picked, and the budget is below what it computes
    config = tiny_config(num_samples=0, selection="all", candidate_patterns=("local3d",), candidate_densities=(0.9,),
                         density_budget=0.05, msad_steps=0)
    with pytest.raises(CalibrationError, match=r"density_budget=0.05: .*compute \d\.\d+ of their video tiles; raise "
                                               r"density_budget"):
        calibrate(tiny.model, samples, config)


def test_non_finite_sample_says_what_to_change():
    tiny, samples = wan_and_samples(count=3)
    samples[2]["hidden_states"].view(-1)[3] = float("nan")
    with pytest.raises(CalibrationError, match="sample 2 input 'hidden_states'.*drop the sample from the list"):
        calibrate(tiny.model, samples, tiny_config())


def test_progress_prints_a_line_per_stage_computed_or_resumed(calibrated, capsys):
    tiny, samples, out, plan = calibrated
    calibrate(tiny.model, samples, tiny_config(progress=True), out=out)  # progress is not in any stage's key
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("calibration: ")]
    stages = plan.metadata["calibration"]["stages"]
    assert len(lines) == len([s for s in stages.values() if not s.startswith("skipped")])
    assert all(" resumed in " in line and line.endswith(" s") for line in lines)
    assert {line.split()[1] for line in lines} == {name for name, s in stages.items() if not s.startswith("skipped")}


@pytest.mark.parametrize("stage, module, function, setting", [
    ("statistics", driver, "collect_statistics", "attention_chunk_elements=16777216"),
    ("ssar", driver, "measure_residuals", "attention_chunk_elements=16777216"),
    ("msad/blocks.1", driver, "distill_block", "num_samples=2"),
])
def test_out_of_gpu_memory_names_the_stage_and_its_settings_and_keeps_earlier_checkpoints(
        calibrated, tmp_path, monkeypatch, stage, module, function, setting):
    """A stage that runs out of GPU memory (simulated: the exception CUDA raises) fails with a CalibrationError that
    names the stage and the settings lowering its memory; the stages before it stay resumable, it saved nothing."""
    tiny, samples, reference_out, plan = calibrated
    original = getattr(module, function)

    def out_of_memory(*args, **kwargs):
        if function == "distill_block" and args[1] != "blocks.1":
            return original(*args, **kwargs)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(module, function, out_of_memory)
    with pytest.raises(CalibrationError, match=rf"stage {stage} ran out of GPU memory \(peak not measured off CUDA\); "
                                               rf"nothing of this stage was saved .*stay valid.* change .*{setting}"):
        calibrate(tiny.model, samples, tiny_config(), out=tmp_path)
    saved = _stage_names(tmp_path)
    assert stage not in saved and "selection" in saved
    assert not list((tmp_path / driver.CHECKPOINT_DIR).rglob("*.tmp"))
    monkeypatch.setattr(module, function, original)
    seen = []
    resumed = calibrate(tiny.model, samples, tiny_config(), out=tmp_path, on_stage=lambda *a: seen.append(a[:2]))
    status = resumed.metadata["calibration"]["stages"]
    assert all(status[name] == "resumed" for name in saved) and status[stage] == "computed"
    assert [name for name, _ in seen] == [name for name, s in status.items() if not s.startswith("skipped")]
    assert resumed.attentions == plan.attentions and resumed.linears == plan.linears
