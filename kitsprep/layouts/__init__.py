"""Source layouts beside the KiTS folders (`kitsprep.cases`): an nnU-Net raw dataset
(`nnunet`) and a MONAI datalist (`datalist`). `kitsprep.cases.find_cases` picks the layout."""
