"""diffusers' pipeline contract, adapted from ``PipelineTesterMixin`` (diffusers'
``tests/pipelines/test_pipelines_common.py``) and run on CPU for both mmdiff pipelines.

The mixin's checks that apply are rewritten here for mmdiff's call (one exam per call, sequences in,
``out.images`` a dict keyed by sequence); each check that does not apply is listed in
:data:`NOT_APPLICABLE` and skipped with its reason. The LDM's ``callback_on_step_end``/interrupt
and its scheduler-as-given contract are tested with the diffusion pipeline's own tests.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from test_pipelines import STEPS, brain_volume, seeded, tiny_gan, tiny_ldm

from mmdiff.pipelines import MMDiffPipeline, MMDiffPipelineOutput, MMGANPipeline

ENGINES = ["ldm", "gan"]


def make(engine: str):
    """The diffusion pipeline as published: with its optional error model."""
    return tiny_ldm(error_model=True) if engine == "ldm" else tiny_gan()


def call_kwargs(engine: str, seed: int = 0) -> dict:
    """One exam (T1 of two brain slices and an empty one) and, for the LDM, steps and a generator."""
    kwargs = {"images": {"t1": brain_volume(2)}, "dataset": "brats"}
    if engine == "ldm":
        kwargs |= {"num_inference_steps": STEPS, "generator": seeded(seed)}
    return kwargs


def run(pipe, engine: str, **extra) -> dict[str, np.ndarray]:
    return pipe(**call_kwargs(engine) | extra).images


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_allclose(np.asarray(a[name], np.float32), np.asarray(b[name], np.float32), rtol=0,
                                   atol=atol, err_msg=name)


def modules(pipe) -> dict[str, torch.nn.Module]:
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


#: PipelineTesterMixin checks that do not apply to mmdiff, with the reason each is skipped
NOT_APPLICABLE = {
    "test_num_images_per_prompt": "text prompts: mmdiff's call is one exam; num_samples draws several samples per "
                                  "slice (the LDM's mean and uncertainty, tested in test_pipelines)",
    "test_cfg": "text prompts: no classifier-free guidance",
    "test_encode_prompt_works_in_isolation": "text prompts: no text encoder",
    "test_callback_cfg": "text prompts: no classifier-free guidance",
    "test_float16_inference": "CUDA: fp16 convolutions need a GPU (bfloat16 runs on CPU: test_to_dtype)",
    "test_save_load_float16": "CUDA: fp16 inference needs a GPU (fp16 weights load: test_export, variants here)",
    "test_xformers_attention_forwardGenerator_pass": "CUDA: xformers",
    "test_sequential_cpu_offload_forward_pass": "CUDA: enable_sequential_cpu_offload needs an accelerator; on a "
                                                "CPU execution device accelerate fails in plain diffusers too "
                                                "(TypeError in set_module_tensor_to_device); the meta-weight "
                                                "forward it relies on is test_models_run_with_offloaded_meta_weights",
    "test_pipeline_with_accelerator_device_map": "CUDA: device_map places components on accelerators",
    "test_attention_slicing_forward_pass": "no attention processors in the GAN; the LDM's UNet and VAE are "
                                           "diffusers blocks without attention at the tiny size",
    "test_StableDiffusionMixin_component": "Stable Diffusion only (FreeU, fused QKV)",
    "test_save_load_dduf": "DDUF is not a format mmdiff publishes (folders in Hugging Face layout)",
    "test_save_load_optional_components": "the mixin's version sets every optional component to None and expects "
                                          "the same output; mmdiff's (the preprocessor, the LDM's error model) "
                                          "change the output by design. Saved and loaded with and without: "
                                          "test_error_scale, test_components_registered_as_given",
    "test_latents_input": "the LDM draws its latents per target sequence on the padded grid; no latents= argument",
}


@pytest.mark.parametrize("name", sorted(NOT_APPLICABLE))
def test_not_applicable(name):
    pytest.skip(NOT_APPLICABLE[name])


@pytest.mark.parametrize("engine", ENGINES)
def test_pipeline_call_signature(engine):
    cls = MMDiffPipeline if engine == "ldm" else MMGANPipeline
    parameters = inspect.signature(cls.__call__).parameters
    optional = {k for k, v in parameters.items() if v.default is not inspect.Parameter.empty}
    # the mixin's required optional parameters that are not about text prompts, and mmdiff's own
    assert {"num_inference_steps", "generator", "output_type", "return_dict"} <= optional
    assert {"dataset", "targets", "brain_mask", "batch_size", "num_samples"} <= optional
    assert "images" in parameters and "images" not in optional


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_class_attribute(engine):
    pipe = make(engine)
    assert pipe.engine == type(pipe).engine == engine


@pytest.mark.parametrize("engine", ENGINES)
def test_save_load_local(engine, tmp_path):
    pipe = make(engine)
    before = run(pipe, engine)
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert set(loaded.components) == set(pipe.components)
    assert_same(before, run(loaded, engine))


@pytest.mark.parametrize("engine", ENGINES)
def test_serialization_with_variants(engine, tmp_path):
    pipe = make(engine)
    pipe.save_pretrained(tmp_path, variant="fp16")
    for name in modules(pipe):
        files = [p.name for p in (tmp_path / name).iterdir()]
        assert any(".fp16." in f for f in files), files
    loaded = type(pipe).from_pretrained(tmp_path, variant="fp16")
    loaded.set_progress_bar_config(disable=True)
    assert_same(run(pipe, engine), run(loaded, engine))


@pytest.mark.parametrize("engine", ENGINES)
def test_dtype_on_load(engine, tmp_path):
    make(engine).save_pretrained(tmp_path)
    loaded = make(engine).from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {c.dtype for c in modules(loaded).values()} == {torch.bfloat16}
    loaded = make(engine).from_pretrained(tmp_path, dtype={"default": torch.bfloat16})
    assert {c.dtype for c in modules(loaded).values()} == {torch.bfloat16}


@pytest.mark.parametrize("engine", ENGINES)
def test_dict_tuple_outputs_equivalent(engine):
    pipe = make(engine)
    out = pipe(**call_kwargs(engine))
    assert isinstance(out, MMDiffPipelineOutput)
    assert isinstance(out.images, dict) and list(out.images) == ["t2", "t1c", "flair", "dwi", "adc"]
    images, uncertainty, mask = pipe(**call_kwargs(engine), return_dict=False)
    assert_same(out.images, images)
    if engine == "gan":
        assert uncertainty is None and out.uncertainty is None  # deterministic: no uncertainty
    else:  # the diffusion pipeline samples K = 4 by default and returns their calibrated spread
        assert_same(out.uncertainty, uncertainty)
    np.testing.assert_array_equal(mask, out.mask)
    assert out[0] is out.images  # BaseOutput: index 0 is images, as diffusers users expect


@pytest.mark.parametrize("engine", ENGINES)
def test_components_function(engine):
    pipe = make(engine)
    parameters = inspect.signature(type(pipe).__init__).parameters
    # components: the required arguments and the optional components; settings with defaults (the
    # diffusion pipeline's calibration) are config, as in diffusers
    init = {n for n, p in parameters.items() if p.default is inspect.Parameter.empty} - {"self"}
    init |= set(type(pipe)._optional_components)
    assert set(pipe.components) == init
    rebuilt = type(pipe)(**pipe.components)
    rebuilt.set_progress_bar_config(disable=True)
    assert_same(run(pipe, engine), run(rebuilt, engine))


@pytest.mark.parametrize("engine", ENGINES)
def test_components_registered_as_given(engine):
    pipe = make(engine)
    components = dict(pipe.components)
    if engine == "ldm":
        components["scheduler"] = DDIMScheduler.from_config(pipe.scheduler.config)
    rebuilt = type(pipe)(**components)
    for name, component in components.items():
        assert getattr(rebuilt, name) is component, name
        # an optional component left out (the GAN's preprocessor) is registered as (None, None)
        assert rebuilt.config[name][1] == (None if component is None else type(component).__name__)


def test_ddpm_scheduler_registered_as_given():
    pipe = tiny_ldm()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    assert MMDiffPipeline(pipe.vae, pipe.unet, scheduler, pipe.predictor).scheduler is scheduler


@pytest.mark.parametrize("engine", ENGINES)
def test_to_device(engine):
    pipe = make(engine).to("cpu")
    assert {c.device.type for c in modules(pipe).values()} == {"cpu"}
    assert pipe.device.type == "cpu" and pipe._execution_device.type == "cpu"
    out = run(pipe, engine)
    assert all(np.isfinite(image).all() for image in out.values())


@pytest.mark.parametrize("engine", ENGINES)
def test_to_dtype(engine):
    """``pipe.to(dtype)`` casts every model; bfloat16 inference runs on CPU and stays close to float32."""
    reference = run(make(engine), engine)
    pipe = make(engine)
    assert {c.dtype for c in modules(pipe).values()} == {torch.float32}
    pipe.to(torch.bfloat16)
    assert {c.dtype for c in modules(pipe).values()} == {torch.bfloat16}
    out = run(pipe, engine)
    assert {image.dtype for image in out.values()} == {np.dtype(np.float32)}  # outputs stay float32 in [0, 1]
    assert_same(reference, out, atol=0.1)


@pytest.mark.parametrize("engine", ENGINES)
def test_layerwise_casting_inference(engine):
    """Weights stored in fp8 and computed in float32 (diffusers' layerwise casting): PFM must cast its
    input to the compute dtype, not to the weights' storage dtype."""
    reference = run(make(engine), engine)
    pipe = make(engine)
    for component in modules(pipe).values():
        component.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert_same(reference, run(pipe, engine), atol=0.25)


@pytest.mark.parametrize("engine", ENGINES)
def test_group_offloading_inference(engine):
    reference = run(make(engine), engine)
    pipe = make(engine)
    cpu = torch.device("cpu")
    for component in modules(pipe).values():
        component.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="block_level",
                                       num_blocks_per_group=1)
    assert_same(reference, run(pipe, engine))


@pytest.mark.parametrize("engine", ENGINES)
def test_model_cpu_offload_forward_pass_twice(engine):
    reference = run(make(engine), engine)
    pipe = make(engine)
    pipe.enable_model_cpu_offload(device="cpu")
    assert_same(reference, run(pipe, engine))
    assert_same(reference, run(pipe, engine))  # hooks reset between calls (maybe_free_model_hooks)


def _offload_to_meta(model: torch.nn.Module) -> None:
    """What sequential CPU offload does to a model: every weight lives on the meta device and is put
    back on the execution device only for the forward of the leaf module that owns it."""
    for leaf in [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]:
        stored = {n: p.detach().clone() for n, p in leaf.named_parameters(recurse=False)}

        def onload(module, args, stored=stored):
            for n, value in stored.items():
                setattr(module, n, torch.nn.Parameter(value, requires_grad=False))

        def offload(module, args, output, stored=stored):
            for n, value in stored.items():
                setattr(module, n, torch.nn.Parameter(torch.empty_like(value, device="meta"), requires_grad=False))

        offload(leaf, None, None)
        leaf.register_forward_pre_hook(onload)
        leaf.register_forward_hook(offload)


def test_models_run_with_offloaded_meta_weights():
    """Both pipelines' networks take devices from their inputs, never from a weight (which is on the
    meta device under sequential offload), and need no value of a meta tensor."""
    gan, ldm = tiny_gan(), tiny_ldm()
    images, sources = torch.rand(2, 6, 16, 16) * 2 - 1, torch.tensor([True, False, False, True, False, False])
    latents = torch.randn(2, 6, ldm.unet.config.latent_channels, 8, 8)
    with torch.no_grad():
        gan_reference = gan.generator(images, sources, torch.tensor([0, -1]))
        unet_reference = ldm.unet(latents, torch.tensor([10, 500]), latents, sources, 1).sample
        _offload_to_meta(gan.generator)
        _offload_to_meta(ldm.unet)
        assert {p.device.type for p in gan.generator.parameters()} == {"meta"}
        torch.testing.assert_close(gan.generator(images, sources, torch.tensor([0, -1])), gan_reference)
        torch.testing.assert_close(ldm.unet(latents, torch.tensor([10, 500]), latents, sources, 1).sample,
                                   unet_reference)


@pytest.mark.parametrize("engine", ENGINES)
def test_progress_bar(engine, capsys):
    pipe = make(engine)
    pipe.set_progress_bar_config(disable=False)
    run(pipe, engine)
    err = capsys.readouterr().err
    assert "1/1" in err, err  # two brain slices: one batch of 8 (times num_samples=1 for the LDM)
    pipe.set_progress_bar_config(disable=True)
    run(pipe, engine)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("engine", ENGINES)
def test_determinism_with_generator(engine):
    pipe = make(engine)
    first, again = run(pipe, engine), run(pipe, engine)
    assert_same(first, again)
    other = pipe(**call_kwargs(engine, seed=1)).images
    if engine == "ldm":  # another seed, other noise
        assert any(not np.array_equal(first[k], other[k]) for k in first)
    else:  # the GAN is deterministic: the generator is accepted and unused
        assert_same(first, other)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_list_of_cases_is_refused_in_one_line(engine):
    """The mixin's batch tests pass a list per input; an mmdiff call is one exam (its slices are
    the batch), so a list of exams is refused with one line that prints no array."""
    pipe = make(engine)
    case_a, case_b = {"t1": brain_volume(2)}, {"t1": brain_volume(3)}
    with pytest.raises(ValueError) as info:
        pipe(**call_kwargs(engine) | {"images": [case_a, case_b]})
    message = str(info.value)
    assert "\n" not in message and "array(" not in message and len(message) < 200
    assert message.startswith("images must be one exam") and "not a list" in message
    assert "call the pipeline once per case" in message
