from pipeline.cli import end_job, main

if __name__ == "__main__":
    end_job(main())
