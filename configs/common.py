"""Shared config defaults (paper §2.3–2.5). Dataset configs override what differs."""
import ml_collections

from fmir_jax.ops import losses


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'fmir'

  # Feature stores written by feature_extract/run.py. `train_stores` may list several
  # (hybrid training); each store brings its own pairs, grid and label count.
  c.data = ml_collections.ConfigDict()
  c.data.train_stores = ('',)          # required: path(s) to feature stores
  c.data.eval_stores = ()              # validation stores (empty: the training stores' val
                                       # pairs); each store weighs the same
  c.data.num_classes = 3               # foreground labels used by Dice (WS) and metrics
  c.data.prefetch = 2                  # batches prepared ahead in a background thread

  # Channel regularisation (paper §2.4) and training mode.
  #   UN  : unsupervised, random channel selection at training, PCA at inference
  #   WS  : UN + Dice on warped labels (lambda_dice)
  #   -CR : unsupervised, PCA at training and inference (ablation)
  c.mode = 'UN'
  c.feature_channels = 256             # c'
  # Feature normalisation around the draw and the PCA (fmir_jax/model/channel_reg.py NORMS):
  #   paper       : raw channels drawn, centred PCA (paper §2.4 as written)
  #   release     : raw channels drawn, uncentred PCA (the authors' code)
  #   standardise : z-scored channels drawn, whitened PCA of the z-scored features
  #   matched     : z-scored channels drawn; PCA of the z-scored features scaled and mixed to
  #                 look like a draw (the head sees at inference what it trained on)
  c.channel_norm = 'paper'

  c.model = ml_collections.ConfigDict()
  c.model.n = 32
  c.model.levels = 5
  c.model.factors = (2, 2, 1)
  c.model.integration_steps = 7
  c.model.activation = 'leaky_relu'
  c.model.head_instance_norm = False
  c.model.exact_feature_path = True
  c.model.kernel_init = 'torch'        # authors' PyTorch default; 'he' learns faster
  c.model.flow_init = 'torch'          # field layer init; 'small' = VoxelMorph's N(0, 1e-5)
  c.model.finest_level = 0             # >0: compressor and head start at that level (lighter)
  c.model.conv_impl = 'auto'           # 'split2d' on CPU (fast XLA:CPU path), 'xla' elsewhere

  c.loss = ml_collections.ConfigDict()
  c.loss.ncc = 1.0
  c.loss.dice = 1.0                    # used in WS mode only (UN / -CR force 0)
  c.loss.smooth = 1.0
  c.loss.ncc_windows = losses.NCC_WINDOWS
  c.loss.blur_sigma = 1.0
  c.loss.blur_in_plane_only = True     # cardiac (anisotropic); abdomen: False

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.decay_power = 0.9            # polynomial decay to 0 over training
  c.optim.grad_clip = 1.0              # global-norm clip (authors' release); 0 = off
  c.optim.amsgrad = True               # authors' release; paper says Adam

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 301
  c.train.num_steps = 0                # >0 overrides epochs
  c.train.batch_size = 1               # global; must divide evenly over devices
  c.train.bidirectional = False        # also train the swapped pair in each step
  c.train.seed = 0
  c.train.log_every = 10
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.eval_every = 1000
  c.train.eval_pairs = 0               # 0 = all validation pairs
  c.train.eval_channel_draw = False    # UN/WS: also validate on a fixed training-style draw
  c.train.pca_max_volumes = 0          # 0 = every training volume feeds the PCA fit
  return c
