"""Test set-up, before any jax import.

- 8 fake CPU devices for the sharding tests, and XLA's backend optimisation off (the
  suite's time is mostly compilation);
- JAX's persistent compilation cache in one folder for the whole session (shared by the
  xdist workers, which `-n auto` in pyproject.toml starts), inherited by the
  subprocess tests through the environment, so that a function compiled by one test (or one
  script launch) is loaded, not recompiled, by the next.
"""

import os
import tempfile

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8"
    # The tests' functions are tiny and compiled once: LLVM's optimisation costs more than it
    # saves (measured on tests/fljax/test_federated.py, cold cache: 114 s -> 77 s).
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fljax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pyproject's addopts): one worker per core, at most 4 (each holds a JAX
  runtime with 8 fake devices; more workers mostly add compilation memory)."""
  del config
  return max(1, min(os.cpu_count() or 1, 4))


# Tests the default run leaves to `-m slow` (as if marked `@pytest.mark.slow`), so that the
# suite stays under 10 minutes on 2 cores from a cold cache: each repeats, end to end or for
# a second batching mode, what a faster test already checks. `pytest -m slow` runs them (CI does not).
SLOW = {
    # whole FL / DP runs whose mechanism a unit test or a cheaper run already covers
    "tests/privacy/test_train.py::test_forward_noise_variants_run",
    "tests/privacy/test_train.py::test_adaptive_dp_fedavg_resumes_identically",
    "tests/privacy/test_train.py::test_every_mechanism_runs[privacy1]",
    "tests/privacy/test_train.py::test_noise_seed_os_draws_noise_nobody_can_regenerate_from_the_seed",
    "tests/privacy/test_centralized.py::test_a_run_with_a_fixed_sigma_extends_as_if_uninterrupted",
    "tests/fljax/test_train.py::test_main_two_rounds_then_resume",
    "tests/fljax/test_train.py::test_a_run_that_failed_before_round_one_leaves_its_workdir_reusable",
    "tests/diffusion/test_training.py::test_outputs_of_a_run",
    "tests/diffusion/test_training.py::test_a_few_steps_on_8x8_digits_lower_the_loss",
    "tests/diffusion/test_hub.py::test_save_then_load_diffusers_round_trips",
    # scripts and drivers end to end
    "tests/studies/test_runner.py::test_trained_models_batches_and_local_steps",
    "tests/studies/test_convergence.py::test_a_victim_stops_where_it_first_converges_and_budgets_are_kept",
    "tests/studies/test_convergence.py::test_script_writes_the_table_and_the_result_line",
    "tests/studies/test_scripts.py::test_scaling_quick_writes_tables_and_figures",
    "tests/inversion/test_experiment.py::test_tiny_run_writes_its_outputs_times_every_phase_and_is_not_repeated",
    "tests/inversion/test_experiment.py::test_image_folder_victims_take_class_folder_labels_and_name_skipped_files",
    "tests/inversion/test_adaptive.py::test_adaptive_pipeline_runs_in_the_experiment_and_reports_the_ceiling",
    "tests/inversion/test_compare.py::test_tiny_comparison_writes_one_table_and_one_grid",
    # convergence demonstrations and second variants of a property checked once already
    "tests/inversion/attacks/test_dlg.py::test_idlg_converges_to_the_victim[adam-300]",
    "tests/inversion/attacks/test_dlg.py::test_idlg_converges_to_the_victim[lbfgs_zoom-60]",
    "tests/inversion/attacks/test_dlg.py::test_every_evaluation_is_charged_once_and_none_repeated[lbfgs_zoom-idlg]",
    "tests/inversion/attacks/test_dlg.py::test_every_evaluation_is_charged_once_and_none_repeated[lbfgs_zoom-optimise]",
    "tests/inversion/attacks/test_dlg.py::test_batched_victims_equal_one_at_a_time[vmap-adam-20]",
    "tests/inversion/attacks/test_diffusion_guided.py::test_reconstruction_error_falls_as_the_guidance_scale_grows",
    "tests/diffusion/test_samplers.py::test_every_sampler_runs_a_unet_prior_with_guidance_through_the_denoiser",
    "tests/fljax/test_federated.py::test_eight_devices_equal_one[map-fedavg]",
    "tests/fljax/test_federated.py::test_fedavg_full_batch_matches_hand_written_reference[vmap]",
    "tests/fljax/test_federated.py::test_server_adam_and_momentum_use_the_pseudo_gradient",
    "tests/fljax/test_models.py::test_output_shapes[shape0-resnet]",
    "tests/privacy/test_federated.py::test_private_rounds_on_four_devices_equal_one[map-vmap]",
    "tests/privacy/test_federated.py::test_private_rounds_on_four_devices_equal_one[map-ghost]",
    "tests/privacy/test_clipping.py::test_clipped_sum_microbatched_equals_whole_and_skips_padding",
    "tests/privacy/test_clipping.py::test_per_example_grads_equal_a_loop[False]",
    "tests/inversion/test_observation.py::test_aggregate_of_equal_fedsgd_clients_is_the_union_batch_gradient",
    "tests/inversion/test_observation.py::test_dp_fedavg_and_record_level_dpsgd_produce_attackable_observations",
    "tests/inversion/test_labels.py::test_idlg_recovers_the_label_for_every_class[cnn-shape1]",
    "tests/inversion/attacks/test_dlg.py::test_dlg_with_optimised_labels_reduces_the_matching_loss",
    "tests/inversion/attacks/test_ig.py::test_inverting_gradients_with_restarts_recovers_one_image",
    "tests/inversion/test_denoise.py::test_pca_denoise_beats_raw_and_projects_at_zero_noise",
    "tests/fljax/test_train.py::test_resume_skips_a_corrupt_newest_checkpoint",
    "tests/fljax/test_models.py::test_no_batch_coupling",
    "tests/fljax/test_federated.py::test_poisson_rounds_agree_between_vmap_and_map",
    "tests/diffusion/test_evaluation.py::test_evaluation_compares_random_subsets_of_class_sorted_data",
    "tests/diffusion/test_samplers.py::test_full_ddpm_chain_matches_the_marginal_unjitted_step",
    "tests/diffusion/test_samplers.py::test_ddim_with_eta_1_is_ddpm_on_the_same_grid",
}



def pytest_collection_modifyitems(config, items):
  del config
  import pytest
  known = set()
  for item in items:
    base = item.nodeid.split("[")[0]
    for name in (item.nodeid, base):
      if name in SLOW:
        item.add_marker(pytest.mark.slow)
        known.add(name)
  # a renamed test must not fall back into the default run unnoticed
  files = {item.nodeid.split("::")[0] for item in items}
  missing = sorted(n for n in SLOW - known if n.split("::")[0] in files)
  if missing and len(items) > 100:  # a whole file, not one test picked by name
    raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {missing}")
