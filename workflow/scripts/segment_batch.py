"""Segment a batch of scans with the model loaded once and measure each; a scan that fails is recorded,
not fatal."""

from ctcohort.imaging import ScanChecks
from ctcohort.qc import QCSettings
from ctcohort.runlog import log_to
from ctcohort.segment import BatchMeasurement, SegmentationSettings, segment_batch

if __name__ == "__main__":  # nnU-Net starts worker processes
    log_to(snakemake.log[0])
    segs, n_models = list(snakemake.output.segs), len(snakemake.output.segs) // len(snakemake.params.subjects)
    segment_batch(
        snakemake.params.subjects,
        snakemake.input.cts,
        # per scan, the label map of each model
        [segs[i : i + n_models] for i in range(0, len(segs), n_models)],
        snakemake.output.statuses,
        model=snakemake.params.model,
        task=snakemake.params.task,
        structures=snakemake.params.structures,
        on_error=snakemake.params.on_error,
        upstream=snakemake.params.upstream,
        ct_checks=ScanChecks.from_config(snakemake.params.ct_checks),
        measurement=BatchMeasurement(
            snakemake.output.measurements,
            snakemake.output.measure_statuses,
            qc_tables=snakemake.output.qc,
            previews=snakemake.output.get("previews") or (),
            settings=QCSettings(**snakemake.params.qc),
        ),
        settings=SegmentationSettings(**snakemake.params.segmentation, threads=snakemake.threads),
    )
