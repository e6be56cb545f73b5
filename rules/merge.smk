# Adapter (or full fine-tune) + base -> merged model in safetensors shards (XTuner's `convert merge`),
# with the tokenizer, the chat_template trained on and a generation_config that stops at the
# template's end of turn. `snakemake merged/` links every experiment's final merge.


rule merge_epoch:
    input:
        unpack(get_merge_input),
    output:
        directory(paths.MERGE),
    params:
        merge=get_merge_params,
    threads: stage_resource("merge", "threads")
    resources:
        mem_mb=stage_resource("merge", "mem_mb"),
        runtime=stage_resource("merge", "runtime"),
        **stage_overrides("merge"),
    conda:
        "../envs/tunemake.yaml"
    log:
        "logs/merge/{experiment}/epoch_{epoch}.log",
    script:
        "../scripts/merge_epoch.py"


# Cheap and local: the links live beside the merges, which stay where chained experiments read them.
localrules:
    merged,


rule merged:
    input:
        merges=list(all_final_merges().values()),
    output:
        directory(paths.MERGED_DIR),
    params:
        links=all_final_merges(),
    conda:
        "../envs/tunemake.yaml"
    log:
        "logs/merged.log",
    script:
        "../scripts/merged.py"
