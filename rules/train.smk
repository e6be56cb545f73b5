# Templated dataset + base model -> one checkpoint per epoch. Epoch n starts from epoch n-1's
# checkpoint and state; its params hold exactly what else its result depends on, so raising
# `epochs` re-runs only the epochs whose learning rates change.


rule train_epoch:
    input:
        unpack(get_train_epoch_input),
    output:
        checkpoint=paths.CHECKPOINT,
        state=directory(paths.TRAIN_STATE),
    params:
        identity=get_epoch_identity,
    # Estimated from the model, method and data (tunemake/resources.py); `resources.train` overrides.
    threads: stage_resource("train", "threads")
    group:
        get_train_group
    resources:
        mem_mb=stage_resource("train", "mem_mb"),
        runtime=stage_resource("train", "runtime"),
        gpu_mem_mb=stage_resource("train", "gpu_mem_mb"),
        **stage_overrides("train"),
        gpu=get_train_gpus,
        gpu_model=get_train_gpu_model,
        nodes=get_train_nodes,
        # nodes > 1 only: one srun task per node, each a torchrun (tunemake.train.launch)
        mpi=get_train_mpi,
        tasks=get_train_mpi_tasks,
        tasks_per_gpu=get_train_tasks_per_gpu,
        gres=get_train_gres,
    conda:
        "../envs/tunemake.yaml"
    log:
        "logs/train/{experiment}/epoch_{epoch}.log",
    script:
        "../scripts/train_epoch.py"
