"""Pixels <-> latents and prompts -> embeddings, one file per codec: the shared video
autoencoder interface (:mod:`.base`), "preview" (:mod:`.preview`), "wan" (:mod:`.vae`),
"taehv" (:mod:`.taehv`), "tiny-ae" (:mod:`.autoencoder`), the text encoders (:mod:`.text`)
and the name -> codec factories (:mod:`.factory`). Nothing here imports the engine."""
