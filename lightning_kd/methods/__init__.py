"""One file per paper: its loss as a pure function and its LightningModule."""
from lightning_kd.methods.ab import AB, ABConnectors, ab_layer_loss, ab_loss
from lightning_kd.methods.active_mixup import (
    ActiveMixup,
    ActiveMixupRounds,
    least_confident_mixes,
    random_mixes,
    soft_target_loss,
)
from lightning_kd.methods.at import AT, at_loss, attention_energy
from lightning_kd.methods.baseline import Baseline
from lightning_kd.methods.byot import BYOT, byot_loss
from lightning_kd.methods.cc import CC, LinearEmbed, cc_kernel_loss, cc_loss, correlation_matrix
from lightning_kd.methods.crd import CRD, ContrastMemory, ContrastSampler, Embed, contrast_loss
from lightning_kd.methods.cskd import CSKD, cskd_loss
from lightning_kd.methods.dist import DIST, dist_loss, dist_terms, pearson_correlation
from lightning_kd.methods.dkd import DKD, dkd_loss, dkd_terms
from lightning_kd.methods.dml import DML, dml_loss
from lightning_kd.methods.fitnet import ConvReg, FitNet, fitnet_loss
from lightning_kd.methods.fsp import FSP, fsp_loss, fsp_matrix
from lightning_kd.methods.ft import FT, Paraphraser, Translator, ft_factor, ft_loss, paraphraser_loss
from lightning_kd.methods.feature_distillation import FeatureDistillation
from lightning_kd.methods.kd import KD, kd_loss
from lightning_kd.methods.logit_standardization import LogitStandardization, logit_standardized_kd_loss, standardize
from lightning_kd.methods.msd import MSD, msd_loss
from lightning_kd.methods.nst import NST, nst_loss
from lightning_kd.methods.ofd import (
    OFD,
    OFDConnector,
    margin_from_batchnorm,
    ofd_loss,
    ofd_margin,
    ofd_stage_weights,
    producing_batchnorm,
)
from lightning_kd.methods.pkt import PKT, cosine_probabilities, pkt_loss
from lightning_kd.methods.reviewkd import ABF, ReviewKD, ReviewKDFusion, hcl_loss, pooled_layer
from lightning_kd.methods.rkd import RKD, pairwise_distances, rkd_angle_loss, rkd_distance_loss, rkd_loss
from lightning_kd.methods.sp import SP, similarity_matrix, sp_loss
from lightning_kd.methods.tfkd import (
    LabelSmoothing,
    TfKDReg,
    TfKDSelf,
    label_smoothing_loss,
    tfkd_reg_loss,
    tfkd_self_loss,
    virtual_teacher,
)
from lightning_kd.methods.unixkd import UNIXKD, uncertainty, unix_loss_terms, unix_mix_weights
from lightning_kd.methods.vid import VID, VIDRegressor, vid_loss

__all__ = [
    "Baseline", "KD", "kd_loss",
    "DKD", "dkd_loss", "dkd_terms", "DIST", "dist_loss", "dist_terms", "pearson_correlation",
    "LogitStandardization", "logit_standardized_kd_loss", "standardize",
    "CSKD", "cskd_loss", "BYOT", "byot_loss", "MSD", "msd_loss", "DML", "dml_loss",
    "FeatureDistillation", "AT", "at_loss", "attention_energy", "SP", "similarity_matrix", "sp_loss",
    "FSP", "fsp_loss", "fsp_matrix",
    "NST", "nst_loss", "PKT", "pkt_loss", "cosine_probabilities",
    "RKD", "rkd_loss", "rkd_distance_loss", "rkd_angle_loss", "pairwise_distances",
    "CC", "cc_loss", "cc_kernel_loss", "correlation_matrix", "LinearEmbed",
    "FT", "ft_loss", "ft_factor", "paraphraser_loss", "Paraphraser", "Translator",
    "FitNet", "fitnet_loss", "ConvReg",
    "AB", "ab_loss", "ab_layer_loss", "ABConnectors",
    "CRD", "contrast_loss", "ContrastMemory", "ContrastSampler", "Embed",
    "LabelSmoothing", "TfKDReg", "TfKDSelf", "label_smoothing_loss", "tfkd_reg_loss", "tfkd_self_loss", "virtual_teacher",
    "ActiveMixup", "ActiveMixupRounds", "least_confident_mixes", "random_mixes", "soft_target_loss",
    "UNIXKD", "uncertainty", "unix_loss_terms", "unix_mix_weights",
    "VID", "vid_loss", "VIDRegressor",
    "OFD", "ofd_loss", "ofd_margin", "margin_from_batchnorm", "ofd_stage_weights", "OFDConnector",
    "producing_batchnorm",
    "ReviewKD", "hcl_loss", "ABF", "ReviewKDFusion", "pooled_layer",
]
