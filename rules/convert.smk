# Epoch checkpoint -> Hugging Face artefact (XTuner's pth_to_hf): a PEFT adapter for LoRA/QLoRA,
# a model directory for full fine-tunes.


rule convert_epoch:
    input:
        unpack(get_convert_input),
    output:
        directory(paths.ADAPTER),
    params:
        base=get_convert_base_path,
        # None: float16 adapters (XTuner's pth_to_hf), full fine-tunes in the base's own dtype
        dtype=None,
        access=get_model_access,
    threads: stage_resource("convert", "threads")
    resources:
        mem_mb=stage_resource("convert", "mem_mb"),
        runtime=stage_resource("convert", "runtime"),
        **stage_overrides("convert"),
    conda:
        "../envs/tunemake.yaml"
    log:
        "logs/convert/{experiment}/epoch_{epoch}.log",
    script:
        "../scripts/convert_epoch.py"
