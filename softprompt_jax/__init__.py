"""softprompt-jax: prompt tuning for frozen T5 models in JAX/Flax."""

from softprompt_jax.checkpoints import load_pretrained, save_pretrained
from softprompt_jax.model import T5, T5Config, get_config, init_params, param_shapes

__all__ = ["T5", "T5Config", "get_config", "init_params", "param_shapes"]
__all__ += ["load_pretrained", "save_pretrained"]

from softprompt_jax.causal_lm import lm_logits, lm_loss_inputs  # noqa: E402
from softprompt_jax.checkpoints.prompt_files import load_prompt, save_prompt  # noqa: E402
from softprompt_jax.ensembles import ensemble_predict  # noqa: E402
from softprompt_jax.inference import score_candidates  # noqa: E402
from softprompt_jax.lm_decoding import lm_generate  # noqa: E402
from softprompt_jax.losses import prompt_loss_and_grad, score_batch  # noqa: E402
from softprompt_jax.model.decoder_config import GPT2Config, LlamaConfig, is_decoder_only  # noqa: E402
from softprompt_jax.prefixes import fold_prefix, init_prefix  # noqa: E402
from softprompt_jax.prompt_bank import PromptBank  # noqa: E402
from softprompt_jax.prompted_t5 import PromptedT5, join_prompt, split_prompt  # noqa: E402
from softprompt_jax.prompts import PROMPT_AXES, init_prompt, prompted_logits  # noqa: E402
from softprompt_jax.reading import nearest_tokens  # noqa: E402
from softprompt_jax.train.optimizer import prompt_only  # noqa: E402

__all__ += [
    "GPT2Config",
    "LlamaConfig",
    "fold_prefix",
    "init_prefix",
    "is_decoder_only",
    "lm_generate",
    "lm_logits",
    "lm_loss_inputs",
]
__all__ += [
    "PROMPT_AXES",
    "PromptBank",
    "PromptedT5",
    "ensemble_predict",
    "init_prompt",
    "join_prompt",
    "load_prompt",
    "nearest_tokens",
    "prompt_loss_and_grad",
    "prompt_only",
    "prompted_logits",
    "save_prompt",
    "score_batch",
    "score_candidates",
    "split_prompt",
]
