"""Realistic bugs planted one at a time by tests/mutation/run.py: (name, file, exact old text, new text, tests).

Each `old` must occur exactly once in its file, so a mutant whose code has moved fails loudly instead of testing
nothing. The tests are the few that should catch the bug, as pytest node ids or files."""

TRAINING_LOSS = "tests/test_training_loss.py"
RESUME_4_6 = "tests/test_resume.py::test_resume_equals_an_uninterrupted_run[4-6-0]"
FORMULA = "tests/test_concat_kv.py::test_conditioning_matches_formula"
INTEROP_TEXT = "tests/test_interop_diffusers.py::test_patched_text_encoder_gives_our_conditioning"
INTEROP_IMAGE = "tests/test_interop_diffusers.py::test_pipeline_renders_our_images"
CONCAT_KV, DDPM = "ldm/modules/encoders/concat_kv.py", "ldm/models/diffusion/ddpm.py"
DDIM, ENCODERS = "ldm/models/diffusion/ddim.py", "ldm/modules/encoders/modules.py"

MUTANTS = [
    # --- CatVersion's K/V ------------------------------------------------------------------------------------------
    ("plus-one-bias-dropped", CONCAT_KV, "return self.logit_bias + math.log(self.strength)",
     "return math.log(self.strength)", [INTEROP_TEXT]),
    ("strength-not-logged", CONCAT_KV, "return self.logit_bias + math.log(self.strength)",
     "return self.logit_bias + self.strength - 1", ["tests/test_concat_kv.py::test_strength_counts_the_concept_token_s_times"]),
    ("keys-and-values-swapped", CONCAT_KV,
     "k, v = per_layer.permute(2, 0, 3, 1, 4)[2 * i:2 * i + 2]",
     "v, k = per_layer.permute(2, 0, 3, 1, 4)[2 * i:2 * i + 2]", [FORMULA]),
    ("bias-on-the-wrong-columns", CONCAT_KV, "mask = torch.cat(columns + [causal], dim=1)",
     "mask = torch.cat([causal] + columns, dim=1)", [FORMULA]),
    ("extra-tokens-appended", CONCAT_KV,
     "keys = torch.cat([k.to(key.dtype) for k, _, _ in extra] + [key], dim=2)\n"
     "    values = torch.cat([v.to(value.dtype) for _, v, _ in extra] + [value], dim=2)",
     "keys = torch.cat([key] + [k.to(key.dtype) for k, _, _ in extra], dim=2)\n"
     "    values = torch.cat([value] + [v.to(value.dtype) for _, v, _ in extra], dim=2)", [FORMULA]),
    ("causal-mask-dropped", CONCAT_KV, 'float("-inf"), dtype=query.dtype, device=query.device).triu(1)',
     'float("-inf"), dtype=query.dtype, device=query.device).triu(n)', [FORMULA]),
    ("authors-file-on-the-first-layers", ENCODERS, "else list(range(self.num_layers - n, self.num_layers))",
     "else list(range(n))", ["tests/test_concat_kv.py::test_hand_written_authors_file_loads_into_vit_l"]),
    ("save-skips-the-pool-key", ENCODERS, "for i in a.layers}, _AUTHORS_POOL_KEY: flat}", "for i in a.layers}}",
     ["tests/test_concat_kv.py::test_save_load_round_trip_both_formats"]),
    ("tokenizer-pads-to-longest", ENCODERS, 'padding="max_length"', 'padding="longest"', ["tests/test_tokenizer.py"]),
    # --- training ----------------------------------------------------------------------------------------------------
    ("training-target-x0", DDPM, "return F.mse_loss(eps.float(), noise.float())",
     "return F.mse_loss(eps.float(), z.float())", [TRAINING_LOSS]),
    ("q-sample-without-sqrt", DDPM, "return a.sqrt() * x_start + (1 - a).sqrt() * noise",
     "return a * x_start + (1 - a) * noise", [TRAINING_LOSS]),
    ("alphas-not-cumulative", DDPM, 'register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float()',
     'register_buffer("alphas_cumprod", (1 - betas).float()', ["tests/test_ddpm.py::test_schedule_is_sd_scaled_linear"]),
    ("beta-schedule-linear-in-beta", "ldm/modules/diffusionmodules/util.py",
     "np.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=np.float64) ** 2",
     "np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)", ["tests/test_ddpm.py::test_schedule_is_sd_scaled_linear"]),
    ("timesteps-from-1", DDPM, "t = torch.randint(0, self.num_timesteps,", "t = torch.randint(1, self.num_timesteps,",
     [TRAINING_LOSS]),
    ("vae-scale-factor-missing", DDPM, "return self.scale_factor * z", "return z", [TRAINING_LOSS]),
    ("decode-without-unscaling", DDPM, "return self.first_stage_model.decode(z / self.scale_factor)",
     "return self.first_stage_model.decode(z)", [INTEROP_IMAGE]),
    ("posterior-std-is-variance", "ldm/modules/distributions/distributions.py", "self.std = torch.exp(0.5 * self.logvar)",
     "self.std = torch.exp(self.logvar)", [TRAINING_LOSS]),
    ("latent-cache-ignores-flip", DDPM, '(bool(f) for f in _as_list(batch["flip"]))',
     '(False for f in _as_list(batch["flip"]))', ["tests/test_fast_path.py::test_cached_step_equals_the_reference_step"]),
    ("lr-not-scaled-by-batch", "ldm/cli/train.py", "lr = accumulate * ngpu * bs * base_lr", "lr = accumulate * ngpu * base_lr",
     ["tests/test_main.py::test_reference_learning_rate_on_one_device_batch_2"]),
    ("flip-never-applied", "ldm/data/personalized.py", "if flip:\n            img = ImageOps.mirror(img)",
     "if False:\n            img = ImageOps.mirror(img)", ["tests/test_personalized.py::test_flip_mirrors"]),
    # --- checkpoints and resume --------------------------------------------------------------------------------------
    ("fp16-adapter-in-last-ckpt", DDPM, 'checkpoint["trainable"] = [p.detach().cpu().clone() for p',
     'checkpoint["trainable"] = [p.detach().cpu().half() for p',
     ["tests/test_main.py::test_resume_continues_at_next_step_with_same_state"]),
    ("resume-rng-not-restored", DDPM, "            restore_rng_states(self._rng_states_to_restore)\n", "", [RESUME_4_6]),
    ("rng-states-not-saved", DDPM, '        checkpoint["rng_states"] = collect_rng_states()\n', "", [RESUME_4_6]),
    ("sampler-position-lost", "ldm/data/datamodule.py",
     'self.anchor = (state["epoch"], state["position"], state["consumed_batches"])',
     'self.anchor = (state["epoch"], 0, state["consumed_batches"])',
     ["tests/test_resume.py::test_sampler_goes_on_from_the_count_of_consumed_batches"]),
    ("pickles-loaded-unsafely", "ldm/weights.py", 'weights_only=True, mmap=', 'weights_only=False, mmap=',
     ["tests/test_weights.py::test_every_reader_refuses_pickled_code_with_the_one_message"]),
    ("failed-write-leaves-its-temporary", "ldm/files.py", "            os.unlink(tmp)\n", "            pass\n",
     ["tests/test_sampling.py::test_png_writes_are_atomic"]),
    # --- sampling ----------------------------------------------------------------------------------------------------
    ("ddim-timesteps-off-by-one", DDIM, "timesteps = torch.arange(0, num_train_timesteps, stride) + 1",
     "timesteps = torch.arange(0, num_train_timesteps, stride)", ["tests/test_ddim.py"]),
    ("ddim-steps-to-the-wrong-level", DDIM, "alphas_cumprod[timesteps[:-1]]])", "alphas_cumprod[timesteps[1:]]])",
     ["tests/test_ddim.py::test_schedule_matches_diffusers"]),
    ("ddim-direction-ignores-sigma", DDIM, "math.sqrt(1 - a_prev - sigma ** 2) * eps", "math.sqrt(1 - a_prev) * eps",
     ["tests/test_ddim.py::test_trajectory_matches_diffusers"]),
    ("plms-coefficient", "ldm/models/diffusion/plms.py", "3: ((55, -59, 37, -9), 24)", "3: ((55, -59, 37, 9), 24)",
     ["tests/test_plms.py::test_trajectory_matches_diffusers"]),
    ("guidance-from-the-conditional", "ldm/models/diffusion/guidance.py",
     "return eps_uncond + scale * (eps_cond - eps_uncond)", "return eps_cond + scale * (eps_cond - eps_uncond)",
     ["tests/test_guidance.py"]),
    ("guidance-halves-swapped", "ldm/models/diffusion/guidance.py", "eps_uncond, eps_cond = model.apply_model(",
     "eps_cond, eps_uncond = model.apply_model(", ["tests/test_guidance.py"]),
    ("uc-computed-with-the-adapter", "ldm/sampling.py", "    with encoder.adapter_disabled():\n        uc = ",
     "    with torch.no_grad():\n        uc = ", ["tests/test_sampling.py::test_unconditional_embedding_is_the_empty_prompt_without_adapter"]),
    # --- evaluation --------------------------------------------------------------------------------------------------
    ("quickgelu-default-flipped", "ldm/evaluation/clip_metrics.py", "quick_gelu=True):", "quick_gelu=False):",
     ["tests/test_evaluate.py::test_compute_metrics_takes_mask_dicts"]),
    ("clip-i-against-one-reference", "ldm/evaluation/clip_metrics.py", "clip_i_rows = (gen_feats @ ref_feats.T).mean(dim=1)",
     "clip_i_rows = (gen_feats @ ref_feats.T)[:, 0]", ["tests/test_evaluate.py::test_metrics_match_direct_computation"]),
]
