"""Synth sites: the four hospitals of the cohort (:data:`SITES`), each with its own vendor, matrix,
bit depth, rescale, photometric interpretation, window presets, noise level and transfer syntaxes."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)


@dataclass(frozen=True)
class Site:
    code: str
    folder: str
    institution: str
    institution_address: str
    issuer: str  # IssuerOfPatientID
    station_prefix: str
    manufacturer: str
    proj_model: str
    ct_model: str
    software: str
    private_creator: str
    implementation_version: str  # file meta ImplementationVersionName (<= 16 chars)
    source_ae: str
    name_style: str  # how the study description spells the name: "caret" or "comma"
    # projection radiography
    proj_modality: str  # DX or CR
    proj_rows: int
    proj_cols: int
    proj_spacing: float  # ImagerPixelSpacing, mm
    proj_magnification: float  # PixelSpacing = ImagerPixelSpacing / magnification
    proj_bits: int  # BitsStored (BitsAllocated 16, unsigned)
    proj_window: bool
    proj_noise: float
    # CT
    ct_share: float  # share of studies that are CT
    ct_matrix: int
    ct_fov: float
    ct_spacing: float  # SliceThickness == SpacingBetweenSlices, mm
    ct_pixel_rep: int
    ct_bits_stored: int
    ct_slope: float
    ct_intercept: float
    ct_tilt: bool  # gantry tilt: slightly oblique ImageOrientationPatient
    ct_recon_circle: bool  # pixels outside the reconstruction circle at the lowest stored value
    ct_table: bool
    ct_head_first_numbering: bool  # InstanceNumber 1 = most superior slice
    ct_noise: tuple[float, float]  # HU noise of the lung / soft-tissue kernel
    ct_kernels: tuple[str, str]  # ConvolutionKernel of the lung / soft-tissue reconstruction
    shuffled_names: bool  # IM file names do not follow slice position
    # transfer syntax: per series, mostly ts_main
    ts_main: UID
    ts_alt: UID
    ts_alt_rate: float
    # natural rates (per CT study) of dose SR / dose screen, written only with defects=True
    sr_rate: float
    sc_rate: float

    @property
    def photometric(self) -> str:
        return "MONOCHROME1" if self.proj_modality == "CR" else "MONOCHROME2"

    @property
    def ct_storage(self) -> str:
        sign = "signed" if self.ct_pixel_rep else "unsigned"
        return f"{sign} {self.ct_bits_stored}-bit, slope {self.ct_slope:g}, intercept {self.ct_intercept:g}"


SITES: tuple[Site, ...] = (
    Site(
        code="A", folder="SITE_A", institution="NORTHGATE GENERAL HOSPITAL",
        institution_address="1200 Harbor Road, Northgate, NY 10950", issuer="NGH-MRN", station_prefix="NGHRAD",
        manufacturer="ACME Medical Systems", proj_model="Radius DR 500", ct_model="Helix 64",
        software="AMS 4.2.1", private_creator="ACME 1.0", implementation_version="ACME_PACS_42",
        source_ae="NGH_PACS", name_style="caret",
        proj_modality="DX", proj_rows=256, proj_cols=256, proj_spacing=1.68, proj_magnification=1.1,
        proj_bits=12, proj_window=True, proj_noise=0.012,
        ct_share=0.45, ct_matrix=64, ct_fov=350.0, ct_spacing=2.5, ct_pixel_rep=1, ct_bits_stored=16,
        ct_slope=1.0, ct_intercept=0.0, ct_tilt=False, ct_recon_circle=False, ct_table=True,
        ct_head_first_numbering=True, ct_noise=(30.0, 10.0), ct_kernels=("LUNG", "STANDARD"),
        shuffled_names=False, ts_main=ExplicitVRLittleEndian, ts_alt=DeflatedExplicitVRLittleEndian,
        ts_alt_rate=0.10, sr_rate=0.30, sc_rate=0.0,
    ),
    Site(
        code="B", folder="SITE_B", institution="RIVERTON VALLEY MEDICAL CENTER",
        institution_address="45 Mill Street, Riverton, NJ 07410", issuer="RVMC", station_prefix="RVMCIMG",
        manufacturer="Borealis Imaging", proj_model="Aurora CR Reader 8", ct_model="Aurora CT 16",
        software="BI-CT 2.9", private_creator="BOREALIS PRIVATE", implementation_version="BOREALIS_2_9",
        source_ae="RVMC_ARCHIVE", name_style="comma",
        proj_modality="CR", proj_rows=240, proj_cols=288, proj_spacing=1.5, proj_magnification=1.0,
        proj_bits=10, proj_window=False, proj_noise=0.022,
        ct_share=0.40, ct_matrix=72, ct_fov=380.0, ct_spacing=5.0, ct_pixel_rep=0, ct_bits_stored=12,
        ct_slope=1.0, ct_intercept=-1024.0, ct_tilt=False, ct_recon_circle=True, ct_table=False,
        ct_head_first_numbering=False, ct_noise=(45.0, 15.0), ct_kernels=("L70", "S30"),
        shuffled_names=False, ts_main=ImplicitVRLittleEndian, ts_alt=ExplicitVRLittleEndian,
        ts_alt_rate=0.15, sr_rate=0.0, sc_rate=0.35,
    ),
    Site(
        code="C", folder="SITE_C", institution="ST. ALDRIC UNIVERSITY HOSPITAL",
        institution_address="9 Cathedral Square, Ashford, CT 06278", issuer="SAUH-PID", station_prefix="SAUHMOD",
        manufacturer="Cygnus Healthcare", proj_model="Cygnus DRX-2", ct_model="Cygnus Vela 128",
        software="CV 31.0.4", private_creator="CYGNUS_IMG 2", implementation_version="CYGNUS_31",
        source_ae="SAUH_GW", name_style="caret",
        proj_modality="DX", proj_rows=288, proj_cols=240, proj_spacing=1.5, proj_magnification=1.0,
        proj_bits=14, proj_window=True, proj_noise=0.010,
        ct_share=0.50, ct_matrix=80, ct_fov=400.0, ct_spacing=2.5, ct_pixel_rep=1, ct_bits_stored=16,
        ct_slope=1.0, ct_intercept=-1024.0, ct_tilt=True, ct_recon_circle=False, ct_table=True,
        ct_head_first_numbering=True, ct_noise=(25.0, 8.0), ct_kernels=("FL51", "FC13"),
        shuffled_names=False, ts_main=JPEG2000Lossless, ts_alt=ExplicitVRLittleEndian,
        ts_alt_rate=0.10, sr_rate=0.25, sc_rate=0.20,
    ),
    Site(
        code="D", folder="SITE_D", institution="KINGSBRIDGE COMMUNITY HOSPITAL",
        institution_address="300 Orchard Lane, Kingsbridge, PA 19335", issuer="KCH", station_prefix="KCHXR",
        manufacturer="Deneb Systems", proj_model="DenebRad 3", ct_model="Deneb Altair 320",
        software="DS 7.1", private_creator="DENEB 1.0", implementation_version="DENEB_GW_7",
        source_ae="KCH_EXPORT", name_style="comma",
        proj_modality="DX", proj_rows=256, proj_cols=320, proj_spacing=1.35, proj_magnification=1.0,
        proj_bits=16, proj_window=False, proj_noise=0.016,
        ct_share=0.45, ct_matrix=64, ct_fov=340.0, ct_spacing=5.0, ct_pixel_rep=0, ct_bits_stored=16,
        ct_slope=0.5, ct_intercept=-1024.0, ct_tilt=False, ct_recon_circle=False, ct_table=False,
        ct_head_first_numbering=True, ct_noise=(35.0, 12.0), ct_kernels=("YL", "YC"),
        shuffled_names=True, ts_main=RLELossless, ts_alt=JPEG2000Lossless,
        ts_alt_rate=0.10, sr_rate=0.10, sc_rate=0.30,
    ),
)
