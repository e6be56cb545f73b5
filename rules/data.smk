# Raw data -> templated dataset (mapped, templated, tokenized, labels masked, packed).
# The output is named by the hash of its recipe, so experiments that differ only in training
# settings share one build; sources and tokenizer files are inputs, so their edits rebuild it.


rule templated_dataset:
    input:
        unpack(get_templated_dataset_input),
    output:
        directory(paths.TEMPLATED_DATASET),
    params:
        recipe=get_recipe,
        files=get_recipe_files,
    # Tokenization scales with threads (8 unless `resources.data` says); Snakemake lowers them to
    # --cores when it must. A CPU job: it asks for no GPU.
    threads: stage_resource("data", "threads")
    resources:
        mem_mb=stage_resource("data", "mem_mb"),
        runtime=stage_resource("data", "runtime"),
        **stage_overrides("data"),
    conda:
        "../envs/tunemake.yaml"
    log:
        "logs/templated_dataset/{data_key}.log",
    script:
        "../scripts/templated_dataset.py"
