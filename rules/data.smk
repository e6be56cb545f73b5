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
    # Tokenization scales with threads; Snakemake lowers this to --cores when it must.
    threads: 8
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/tunemake.yaml"
    log:
        "logs/templated_dataset/{data_key}.log",
    script:
        "../scripts/templated_dataset.py"
