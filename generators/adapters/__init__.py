"""Official adapter model code used at generation: the image projection models and strict
checkpoint readers of the identity adapters a method conditions the UNet with
(IP-Adapter-FaceID Plus v2: :mod:`generators.adapters.faceid`; InstantID:
:mod:`generators.adapters.instantid`)."""
