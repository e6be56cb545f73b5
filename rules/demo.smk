# The offline demo: synthetic data, and a base model (tokenizer + random Llama) built from it.


rule demo_data:
    output:
        corpus=f"{DEMO_DIR}/corpus.txt",
        tasks=f"{DEMO_DIR}/tasks.jsonl",
    params:
        demo=canonical(TM["demo"]),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/tunemake.yaml"
    log:
        "logs/demo_data/demo.log",
    script:
        "../scripts/demo_data.py"


rule demo_tokenizer:
    input:
        corpus=rules.demo_data.output.corpus,
    output:
        [f"{{model_dir}}/{name}" for name in TOKENIZER_FILES],
    params:
        model=get_demo_model,
        templates=canonical(TM["templates"]),
    threads: 2
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/tunemake.yaml"
    log:
        "logs/demo_tokenizer/{model_dir}.log",
    script:
        "../scripts/demo_tokenizer.py"


rule demo_model:
    input:
        tokenizer=[f"{{model_dir}}/{name}" for name in TOKENIZER_FILES],
    output:
        [f"{{model_dir}}/{name}" for name in MODEL_FILES],
    params:
        model=get_demo_model,
    threads: 1
    resources:
        mem_mb=get_demo_model_mem_mb,
        runtime=10,
    conda:
        "../envs/tunemake.yaml"
    log:
        "logs/demo_model/{model_dir}.log",
    script:
        "../scripts/demo_model.py"
