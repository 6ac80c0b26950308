"""Tests of experiments/config_flags.py: flags generated from the schema."""

import os
import sys

from absl import flags
from absl.testing import absltest

from testutil import ROOT, run_script  # pylint: disable=g-bad-import-order

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
import config_flags  # pylint: disable=g-import-not-at-top,g-bad-import-order
from uta_jax import configs  # pylint: disable=g-bad-import-order


def parsed(*args):
  values = flags.FlagValues()
  config_flags.define(flag_values=values)
  values(['prog', *args])
  return values


class ConfigFlagsTest(absltest.TestCase):

  def test_every_setting_has_one_flag_with_the_names_users_type(self):
    values = parsed()
    paths = [s.path for s in configs.settings()]
    names = [config_flags.flag_name(p) for p in paths]
    self.assertLen(set(names), len(paths))
    for name in names:
      self.assertIn(name, values)
    self.assertEqual(
        [config_flags.flag_name(p) for p in (
            'seed', 'attack.name', 'attack.eps_train', 'eval.pgd_steps',
            'model.ensemble_size', 'optimizer.name')],
        ['seed', 'attack', 'eps_train', 'eval_pgd_steps', 'ensemble_size',
         'optimizer'])
    self.assertIn('one of none, fgsm', values['attack'].help)

  def test_given_flags_become_overrides_and_fractions_are_exact(self):
    values = parsed('--attack=pgd', '--eps_train=8/255', '--num_steps=3',
                    '--eval_eps=0.1,16/255', '--ensemble_size=3',
                    '--max_train_examples=100')
    got = config_flags.overrides(flag_values=values)
    self.assertEqual(got, {
        'attack.name': 'pgd', 'attack.eps_train': 8 / 255,
        'attack.num_steps': 3, 'eval.eps': [0.1, 16 / 255],
        'model.ensemble_size': 3, 'max_train_examples': 100})
    config = configs.get_config('mnist', got)
    self.assertEqual((config.attack.eps_train, config.eval.eps,
                      config.model.ensemble_size),
                     (8 / 255, (0.1, 16 / 255), 3))
    self.assertEqual(config_flags.overrides(flag_values=parsed()), {})

  def test_booleans_are_absl_bools(self):
    self.assertEqual(config_flags.overrides(flag_values=parsed('--noaugment')),
                     {'augment': False})
    self.assertEqual(config_flags.overrides(flag_values=parsed('--augment')),
                     {'augment': True})

  def test_bad_numbers_are_refused_by_the_parser(self):
    for bad in ('--eps_train=abc', '--eps_train=1/0', '--eval_eps=0.1,x'):
      with self.assertRaises(flags.IllegalFlagValueError):
        parsed(bad)

  def test_errors_name_the_flag_the_user_typed(self):
    with self.assertRaises(configs.ConfigError) as e:
      configs.get_config('mnist', {'attack.name': 'pgd',
                                   'attack.uncertainty': 'mc_dropout',
                                   'attack.num_samples': 5})
    self.assertEqual(config_flags.message(e.exception),
                     '--uncertainty=mc_dropout needs --attack=uta')
    with self.assertRaises(configs.ConfigError) as e:
      configs.get_config('mnist', {'eval.batch_size': 0})
    self.assertIn('--eval_batch_size must be', config_flags.message(
        e.exception))

  def test_presets_written_as_flags_map_to_paths(self):
    self.assertEqual(config_flags.as_paths({'attack': 'uta',
                                            'ensemble_size': 5}),
                     {'attack.name': 'uta', 'model.ensemble_size': 5})
    with self.assertRaises(KeyError):
      config_flags.as_paths({'colour': 'red'})


class HelpTest(absltest.TestCase):
  """What --help and --print_config show, as a user runs them."""

  def test_print_config_shows_the_resolved_preset_and_the_overrides(self):
    proc = run_script('train', '--dataset=svhn', '--print_config',
                      '--epochs=7')
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    svhn = configs.get_config('svhn')
    lines = proc.stdout.splitlines()
    self.assertEqual(lines[0], '# svhn preset; * = set by a flag')
    for flag in (f'--eps_train={svhn.attack.eps_train:g}',
                 f'--num_steps={svhn.attack.num_steps}',
                 f'--step_schedule={svhn.attack.step_schedule}'):
      self.assertTrue(any(l.startswith(f'  {flag} ') for l in lines), flag)
    self.assertTrue(any(l.startswith('* --epochs=7 ') for l in lines))
    self.assertFalse(os.path.exists(os.path.join(ROOT, 'runs', 'svhn_uta_eps'
                                                 f'{svhn.attack.eps_train:g}')))

  def test_help_lists_the_shared_flags_and_the_default_presets_values(self):
    table1 = run_script('table1', '--help').stdout
    for flag in ('--preset', '--seeds', '--methods', '--output_dir',
                 '--aa_version', '--max_runs_per_program'):
      self.assertIn(f'  {flag}:', table1)
    train = run_script('train', '--help').stdout
    self.assertIn('  --run_map:', train)
    self.assertIn('(mnist_embedded: 0.2;', ' '.join(train.split()))

  def test_old_autoattack_version_names_are_aliases(self):
    proc = run_script('train', '--autoattack_version=apgd', '--print_config')
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    proc = run_script('evaluate', '--version=apgd')  # no --workdir: refused
    self.assertEqual(proc.returncode, 2, proc.stderr[-2000:])
    self.assertNotIn('Unknown command line flag', proc.stderr)



class LogNoiseTest(absltest.TestCase):
  """cli's filter: orbax's failed-write tracebacks go, other logs stay."""

  def test_orbax_write_task_errors_are_dropped_and_others_kept(self):
    import logging  # pylint: disable=g-import-not-at-top
    import cli  # pylint: disable=g-import-not-at-top
    keep = cli._RaisedInMainThread().filter  # pylint: disable=protected-access

    def record(name, message, pathname='x.py'):
      return logging.LogRecord(name, logging.ERROR, pathname, 1, message,
                               None, None)
    self.assertFalse(keep(record(
        'asyncio', 'Task exception was never retrieved\nfuture: <Task '
        'coro=<NumpyHandler._open_and_write() defined at /x/orbax/a.py>')))
    self.assertFalse(keep(record('absl', 'thread raised an exception',
                                 '/site-packages/orbax/checkpoint/x.py')))
    self.assertTrue(keep(record('asyncio', 'Task exception was never '
                                'retrieved\nfuture: <Task coro=<mine()>')))
    self.assertTrue(keep(record('uta_jax', 'epoch 1 step 2')))

if __name__ == '__main__':
  absltest.main()
