"""Image tokenizers: the protocol (:mod:`.protocol`), THE registry of kinds (:mod:`.registry`), one file per model
(:mod:`.dvae` DALLE-pytorch's dVAE, :mod:`.vqgan` + :mod:`.quantizers` taming's VQGAN, :mod:`.styled` Styled-VQ),
one per loss component (:mod:`.lpips`, :mod:`.discriminator`, :mod:`.vqgan_loss`), loading any of our tokenizer
checkpoints (:mod:`.load`) or a taming one (:mod:`.convert`), and dVAE/VQGAN training, evaluation and tokenizing
(``python -m vae_train``)."""
