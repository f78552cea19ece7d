
from .catalog import (  # noqa: E402
    COCO_CATEGORIES,
    VOC_CLASSES,
    DatasetCatalog,
    Metadata,
    MetadataCatalog,
    datasets_root,
    prepare_dataset,
    register_coco_instances,
    register_pascal_voc,
)
from .datasets import (  # noqa: E402
    CocoDetectionDataset,
    DatasetFromList,
    MapDataset,
    VOCDetectionDataset,
    load_coco_json,
    load_voc_instances,
    read_image,
)
from .loader import (  # noqa: E402
    GroupedBatchSampler,
    InferenceSampler,
    TrainingSampler,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset,
    get_detection_dataset_dicts,
    skip_train_batches,
)
from .rtdetr_transforms import (  # noqa: E402
    RTDETR_TRAIN_SCALES,
    BatchMultiScaleResize,
    RTDETRDatasetMapper,
    rtdetr_test_augmentation,
    rtdetr_train_augmentation,
)
from .transforms import (  # noqa: E402
    DetrDatasetMapper,
    RandomCrop,
    ResizeShortestEdge,
    detr_test_augmentation,
    detr_train_augmentation,
)
