"""Names of the files and folders a run, an adapter, a report and a pushed repo hold, in one place (as PEFT's
``utils/constants.py``). Every module reads them from here, so renaming one never leaves a reader behind."""

from __future__ import annotations

# A training run: OUTPUT_DIR/{recipe.yaml, metrics.jsonl, adapter/, checkpoints/update-000010/, report/}
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RANK_STATES_FILE = "rank_states.pt"  # a checkpoint's RNG states and probe frames, one entry per process
LOCK_FILE = ".rvla_peft.lock"  # held by the run writing the folder (rvla_peft.utils.runlock)
CHECKPOINT_PREFIX = "update-"  # checkpoints/update-000010/
TENSORBOARD_RUN = "rvla_peft"  # TensorBoard's events: OUTPUT_DIR/rvla_peft/

# An adapter folder (what PeftModel.from_pretrained reads, plus the policy's own trained heads beside it)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
VALUE_HEAD_FILE = "value_head.safetensors"  # the PPO critic, never inside the adapter peft loads
ACTION_HEADS_FILE = "action_heads.safetensors"  # fully trained non-LoRA heads (OpenVLA-OFT's action/scale heads)
# The files a policy is rebuilt from; the rest of a pushed repo (card, plots, report) is for people.
POLICY_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, VALUE_HEAD_FILE, ACTION_HEADS_FILE, RECIPE_FILE)

# A robustness report (python -m rvla_peft.eval --out DIR); push looks for OUTPUT_DIR/report by default
REPORT_DIR = "report"
REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "robustness.png"
VIDEOS_DIR = "videos"  # REPORT_DIR/videos/SETTING.mp4 and .gif (python -m rvla_peft.eval --video K)

# A model card and what it shows
CARD_FILE = "README.md"
CURVE_PNG = "training_curve.png"

# A checkpoint made by rvla_peft.pretrain: its decoding settings and its training record
POLICY_SETTINGS_FILE = "policy.json"
PRETRAIN_RECORD_FILE = "pretrain.json"
SFT_RECORD_FILE = "sft.json"  # a warm-up (rvla_peft.sft): its recipe, data and history

# Model names: "builtin:NAME" is a tiny model built from a config, or a checkpoint shipped in the package
BUILTIN_PREFIX = "builtin:"
# A Hub repo id as recipes write it: "user/name" or "name" (the logged-in user's)
HUB_REPO_ID_PATTERN = r"[\w.-]+(/[\w.-]+)?"
