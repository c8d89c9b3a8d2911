"""The package ``trtllm-serve --custom_module_dirs`` imports: it registers armor-export's ARMOR model classes.

    trtllm-serve armor-out/trtllm --backend pytorch --custom_module_dirs <armor-export>/engines/trtllm_module/armor_trtllm

TensorRT-LLM puts this folder's parent on ``sys.path`` and imports ``armor_trtllm``; the classes themselves live
in ``engines.trtllm_model`` (armor-export must be importable: installed, or its folder on PYTHONPATH), so the
executor's worker processes, which receive the model-class table by pickle, import them by the same name.
"""
import engines.trtllm_model  # noqa: F401  (registers the Armor*ForCausalLM classes)
