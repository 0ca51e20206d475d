import embedserve

embedserve.keep_checkout_off_path()

from embedserve.cli import main  # noqa: E402

main()
