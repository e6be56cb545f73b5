# Hub models and datasets -> the standard Hugging Face cache. A local job: login nodes have
# internet where compute nodes often do not. Offline, a cached repository passes as it is.


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
