"""The PixelCNN prior over a trained model's codes: fitting, sampling, bits per dimension."""
