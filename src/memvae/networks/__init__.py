"""The networks: encoder, decoder, the autoencoder around a quantiser, the PixelCNN prior's network."""
