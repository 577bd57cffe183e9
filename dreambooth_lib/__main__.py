from dreambooth_lib.cli import main

raise SystemExit(main())
