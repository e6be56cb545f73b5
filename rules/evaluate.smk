# Evaluations as build targets: held-out loss/perplexity and scored generations per epoch
# (epoch 0 is the model an experiment starts from), then a summary table and plots for the report.


rule evaluate_epoch:
    input:
        unpack(get_eval_input),
    output:
        paths.EVAL,
    wildcard_constraints:
        epoch=r"\d+",
    params:
        model=get_eval_model_path,
        template=get_eval_template,
        settings=canonical(TM["evaluation"]),
        access=get_eval_access,
    threads: stage_resource("evaluate", "threads")
    resources:
        mem_mb=stage_resource("evaluate", "mem_mb"),
        runtime=stage_resource("evaluate", "runtime"),
        gpu_mem_mb=stage_resource("evaluate", "gpu_mem_mb"),
        **stage_overrides("evaluate"),
        gpu=get_eval_gpus,
        gpu_model=get_eval_gpu_model,
    conda:
        "../envs/tunemake.yaml"
    log:
        "logs/evaluate/{experiment}/epoch_{epoch}.log",
    script:
        "../scripts/evaluate_epoch.py"


rule eval_summary:
    input:
        evals=all_evals(),
    output:
        summary=report(paths.EVAL_SUMMARY, category="Evaluations", labels={"figure": "summary table"}),
        metrics=report(f"{paths.EVAL_PLOTS}/metrics_per_epoch.png", category="Evaluations",
                       labels={"figure": "metrics per epoch"}),
        training=report(f"{paths.EVAL_PLOTS}/training_loss.png", category="Evaluations",
                        labels={"figure": "training loss"}),
    params:
        train_logs=train_metric_logs(),
    localrule: True
    conda:
        "../envs/tunemake.yaml"
    log:
        "logs/eval_summary.log",
    script:
        "../scripts/eval_summary.py"
