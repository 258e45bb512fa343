// steinpix's pixel classification as a Nextflow pipeline: prepare once, one `run` task per
// image, then collect the probabilities into one folder.
//
//     nextflow run main.nf --data /path/to/steinbock/data --ilp pretrained.ilp
//
// --data holds img/*.tiff and panel.csv; --ilp is the trained project, relative to --data.
// Outputs: <data>/ilastik_probabilities/<stem>.tiff (copied there by publishDir).

params.data = "."
params.ilp = "pixel_classifier.ilp"
params.cropsize = 50
params.seed = 123

process PREPARE {
    input:
    path data

    output:
    path "ilastik_img/*.h5"

    script:
    """
    steinpix classify ilastik prepare --img ${data}/img --panel ${data}/panel.csv \\
        --cropsize ${params.cropsize} --seed ${params.seed} -o pixel_classifier_untrained.ilp
    """
}

process RUN {
    cpus 1
    publishDir params.data, mode: "copy"  // keeps the relative path: <data>/ilastik_probabilities/

    input:
    tuple path(img), path(ilp)

    output:
    path "ilastik_probabilities/*.tiff"

    script:
    """
    steinpix classify ilastik run --ilp ${ilp} --threads ${task.cpus} -o ilastik_probabilities ${img}
    """
}

workflow {
    def data = file(params.data, checkIfExists: true)
    def ilp = file("${params.data}/${params.ilp}", checkIfExists: true)
    PREPARE(data).flatten().combine(Channel.of(ilp)) | RUN | collect | view { "${it.size()} probability images" }
}
