"""VideoHelperSuite's VHS_VideoCombine."""
