"""The commands a user is told to run on a folder of their own scans and a labels CSV: the README's "Your own
data", the demo's closing advice and docs/finetuning.md quote exactly these lines (tests/test_docs.py keeps them
equal), with the defaults the recipe uses (launch/recipes/volumes.sh): the grid and resampling chosen from the
headers, the small hybrid ViT, 5-fold cross-validation with the fold ensemble as the final model."""

OWN_DATA_COMMANDS = (
    "volmae-cache --input /data/scans --output /data/cache --size auto --resample auto",
    "volmae-pretrain --data_path /data/cache --model auto --batch_size 32 --output_dir runs/mae",
    "volmae-finetune --setup volumes --meta labels.csv --label malignant --group patient_id --folds 5 \\\n"
    "    --finetune runs/mae/encoder.pth --model auto --output_dir runs/classifier",
    "volmae-predict --checkpoint runs/classifier/final_model --input_csv cases.csv --output_csv predictions.csv "
    "--explain maps/",
    "volmae-export --checkpoint runs/classifier/final_model --format onnx --output_dir export/classifier",
)


def own_data_lines(indent: str = "") -> list[str]:
    """The commands as printed or quoted, one line each (a continued command on two)."""
    return [f"{indent}{line}" for command in OWN_DATA_COMMANDS for line in command.split("\n")]
