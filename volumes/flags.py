"""The volume preprocessing flags every command that reads volumes shares (volmae-cache, volmae-pretrain on
files, volmae-finetune --setup volumes), and the PreprocessConfig they name: the one place these flags are
defined and turned into a configuration."""
from .preprocess import AUTO, CT_WINDOWS, MODALITIES, NONFINITE_POLICIES, RESAMPLE_MODES, PreprocessConfig
from .reading import MAX_VOXELS


def add_preprocess_args(parser, default_resample: str = "fit", allow_auto: bool = False) -> None:
    """The volume preprocessing flags, shared by the cache builder, the on-the-fly loader and the volumes setup.
    With `allow_auto`, `--resample auto` lets the headers of the set choose (volumes.preprocess_choice)."""
    group = parser.add_argument_group("volume preprocessing")
    modes = RESAMPLE_MODES + ((AUTO,) if allow_auto else ())
    group.add_argument("--resample", choices=modes, default=default_resample,
                       help="fit: isotropic, largest extent fits, rest padded; stretch: each axis to the grid; "
                            "spacing: given mm, centre crop/pad"
                            + ("; auto: chosen from the set's headers (a common spacing when the physical extents "
                               "differ, else fit), printed with the reason" if allow_auto else "")
                            + " (default: %(default)s)")
    group.add_argument("--spacing", default=None, help="mm per voxel (D,H,W or one value) for --resample spacing")
    group.add_argument("--modality", choices=MODALITIES, default="auto",
                       help="ct: HU window; mr: percentiles; auto: DICOM tag, else CT if air-like HU values")
    group.add_argument("--ct_window", default="wide",
                       help=f"CT window: a preset ({', '.join(CT_WINDOWS)}) or LOW,HIGH in HU (default wide = -1000,1000)")
    group.add_argument("--nonfinite", choices=NONFINITE_POLICIES, default="skip",
                       help="volumes with NaN/Inf voxels: skip them with the count as reason (default), or fill "
                            "those voxels with the background (CT air, MR minimum) and warn")
    group.add_argument("--max_voxels", type=int, default=MAX_VOXELS,
                       help="skip, from the header and before decoding, volumes with more voxels than this "
                            "(default %(default)s: about 8 GB while preprocessing), or more decoded bytes than "
                            "that many 4-byte voxels")
    group.add_argument("--allow_external_data", action="store_true",
                       help="let a detached header (.mhd, .nhdr) name a data file outside its own folder "
                            "(refused by default: a CSV row could otherwise make VolMAE read any file)")


def preprocess_config_from_args(args, size: tuple[int, int, int]) -> PreprocessConfig:
    """The configuration the flags name; with `--resample auto`, the fit placeholder that keeps the windows and
    limits for the automatic choice to start from."""
    if args.ct_window in CT_WINDOWS:
        window = CT_WINDOWS[args.ct_window]
    else:
        window = tuple(float(v) for v in args.ct_window.split(","))
    spacing = None
    if args.spacing is not None:
        values = tuple(float(v) for v in args.spacing.split(","))
        spacing = values * 3 if len(values) == 1 else values
    resample = "fit" if args.resample == AUTO else args.resample
    return PreprocessConfig(size=size, resample=resample, spacing=spacing, modality=args.modality,
                            ct_window=window, nonfinite=args.nonfinite, max_voxels=args.max_voxels,
                            external_data=args.allow_external_data)
