"""`--help` a person can read: every flag of the entry points explains itself, sits in a topic group
and shows its default."""
import argparse

import pytest

from volmae.finetuning.flags import get_args_parser as finetune_parser
from volmae.main_cache import get_args_parser as cache_parser
from volmae.main_export import get_args_parser as export_parser
from volmae.main_predict import get_args_parser as predict_parser
from volmae.pretraining.flags import get_args_parser as pretrain_parser
from volmae.studies import demo, medmnist, volumes

pytestmark = pytest.mark.fast  # in-process: `make test-fast`

PARSERS = {"volmae-cache": cache_parser, "volmae-pretrain": pretrain_parser, "volmae-finetune": finetune_parser,
           "volmae-predict": predict_parser, "volmae-export": export_parser, "volmae-study demo": demo.get_args_parser,
           "volmae-study medmnist": medmnist.get_args_parser, "volmae-study volumes": volumes.get_args_parser}


def flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]


@pytest.mark.parametrize("command", PARSERS)
def test_every_flag_has_help_and_a_topic_group(command):
    parser = PARSERS[command]()
    missing = [action.option_strings[0] for action in flags(parser) if not (action.help or "").strip()]
    assert not missing, f"{command}: flags without help: {missing}"
    ungrouped = [action.option_strings[0] for group in parser._action_groups
                 if group.title in ("options", "optional arguments", "positional arguments")
                 for action in group._group_actions if not isinstance(action, argparse._HelpAction)]
    assert not ungrouped, f"{command}: flags outside a topic group: {ungrouped}"


@pytest.mark.parametrize("command", PARSERS)
def test_help_shows_defaults(command):
    parser = PARSERS[command]()
    formatter = parser._get_formatter()
    hidden = [action.option_strings[0] for action in flags(parser)
              if action.default not in (None, False, argparse.SUPPRESS) and not action.required
              and "default" not in formatter._expand_help(action)]
    assert not hidden, f"{command}: flags whose default --help does not show: {hidden}"
    assert "(default: " in parser.format_help()
