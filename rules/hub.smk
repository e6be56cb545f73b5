# Hub models and datasets -> the standard Hugging Face cache. A local job: login nodes have
# internet where compute nodes often do not. Offline, a cached repository passes as it is.


# tunemake.lock gains what common.smk resolved, when a run starts: never in a dry run, never in a job.
onstart:
    if PINNED != LOCKED:
        write_lock(PINNED, LOCK_FILE)


rule fetch_hub:
    output:
        paths.HUB_RECEIPT,
    params:
        repo=get_hub_repo,
    localrule: True
    conda:
        "../envs/tunemake.yaml"
    log:
        "logs/fetch_hub/{receipt}.log",
    script:
        "../scripts/fetch_hub.py"
