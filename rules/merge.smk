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
    threads: 1
    resources:
        mem_mb=get_merge_mem_mb,
        runtime=60,
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
